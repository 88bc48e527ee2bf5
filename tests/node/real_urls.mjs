// The official Node code-interpreter SDK with real URLs only (E2B_DOMAIN, TLS trusted by
// NODE_EXTRA_CA_CERTS, wildcard DNS): create, a command, a file, run_code, a server started in
// the sandbox reached at getHost(port), kill. Prints one JSON line of results.
import { Sandbox } from '@e2b/code-interpreter'

const sbx = await Sandbox.create('code-interpreter-v1', { timeoutMs: 120_000 })
try {
  const run = await sbx.commands.run('echo node-$((6 * 7))')
  await sbx.files.write('/home/user/real-urls.txt', 'via wildcard dns')
  const read = await sbx.files.read('/home/user/real-urls.txt')
  const execution = await sbx.runCode('21 * 2')
  await sbx.commands.run('cd /home/user && python3 -m http.server 8001', { background: true })
  const host = sbx.getHost(8001)
  let status = null
  let listing = ''
  for (let attempt = 0; attempt < 100 && status !== 200; attempt++) {
    try {
      const response = await fetch(`https://${host}/`)
      status = response.status
      listing = await response.text()
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  console.log(JSON.stringify({
    stdout: run.stdout, read, result: execution.text, host, status,
    listed: listing.includes('real-urls.txt'),
  }))
} finally {
  await sbx.kill()
}

// The official Node SDK through the whole stack: create, run a command, write and read a file,
// list a directory, run code in the code interpreter, kill. Prints one JSON line of results.
import { Sandbox } from 'e2b'

const sbx = await Sandbox.create('base', { timeoutMs: 60_000 })
try {
  const run = await sbx.commands.run('echo node-$((6 * 7)); whoami')
  await sbx.files.write('/home/user/from-node.txt', 'written by node')
  const read = await sbx.files.read('/home/user/from-node.txt')
  const names = (await sbx.files.list('/home/user')).map((e) => e.name)
  let failedExit = null
  try {
    await sbx.commands.run('exit 7')
  } catch (err) {
    failedExit = err.exitCode
  }
  console.log(JSON.stringify({ stdout: run.stdout, read, names, failedExit }))
} finally {
  await sbx.kill()
}

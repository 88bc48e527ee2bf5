// The official Node SDK against Coppice's lifecycle API (E2B_API_URL, E2B_API_KEY from the env):
// create, list with a metadata filter, kill, kill again. Prints one JSON line with the results.
import { Sandbox } from 'e2b'

const marker = `node-${process.pid}`
const sbx = await Sandbox.create('base', { metadata: { marker }, timeoutMs: 60_000 })
const paginator = Sandbox.list({ query: { metadata: { marker } } })
const listed = []
while (paginator.hasNext) {
  listed.push(...(await paginator.nextItems()))
}
const killed = await Sandbox.kill(sbx.sandboxId)
const killedAgain = await Sandbox.kill(sbx.sandboxId)
console.log(JSON.stringify({
  sandboxId: sbx.sandboxId,
  domain: sbx.sandboxDomain,
  listed: listed.length === 1 && listed[0].sandboxId === sbx.sandboxId,
  killed,
  killedAgain,
}))

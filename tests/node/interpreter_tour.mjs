// The official Node code-interpreter SDK on code-interpreter-v1: a matplotlib chart's
// result.chart, a DataFrame's result.data, runCode in javascript, typescript and r (a value and
// state across two calls), a created context's cwd, per-execution envs. Prints one JSON line.
import { Sandbox } from '@e2b/code-interpreter'

const sbx = await Sandbox.create('code-interpreter-v1', { timeoutMs: 300_000 })
try {
  const plotted = await sbx.runCode(
    "import matplotlib.pyplot as plt\n" +
      "plt.figure()\n" +
      "plt.bar(['oak', 'ash', 'elm'], [12, 7, 3])\n" +
      "plt.title('Coppiced stools')\n" +
      "plt.show()\n",
  )
  const chart = plotted.results[0]?.chart
  const framed = await sbx.runCode(
    "import pandas as pd\npd.DataFrame({'tree': ['oak', 'ash'], 'age': [40, 7]})\n",
  )

  const languages = {}
  for (const [language, define, use] of [
    ['javascript', 'let counter = 41', 'counter + 1'],
    ['typescript', 'const counted: number = 41', 'counted + 1'],
    ['r', 'counter <- 41', 'counter + 1'],
  ]) {
    const value = (await sbx.runCode('6 * 7', { language })).results[0]?.text?.trim()
    const first = await sbx.runCode(define, { language })
    const second = await sbx.runCode(use, { language })
    languages[language] = {
      value,
      state: second.results[0]?.text?.trim(),
      errors: [first.error?.value ?? null, second.error?.value ?? null],
    }
  }

  const context = await sbx.createCodeContext({ cwd: '/tmp', language: 'python' })
  const cwd = (await sbx.runCode('import os; os.getcwd()', { context })).text

  const during = await sbx.runCode("import os; os.environ.get('TOUR_VAR')", {
    envs: { TOUR_VAR: 'per execution' },
  })
  const after = await sbx.runCode("import os; os.environ.get('TOUR_VAR', 'unset')")

  console.log(JSON.stringify({
    chartType: chart?.type ?? null,
    chartTitle: chart?.title ?? null,
    chartBars: chart?.elements?.map((bar) => [bar.label, bar.value]) ?? null,
    data: framed.results[0]?.data ?? null,
    languages,
    context: { language: context.language, cwd: context.cwd },
    cwd,
    envDuring: during.text,
    envAfter: after.text,
  }))
} finally {
  await sbx.kill()
}

"""Rich results through the official `e2b-code-interpreter` SDK against a real `coppice serve`
on the built `code-interpreter-v1` template: matplotlib figures come back as `result.chart`
(the `e2b/chart` bundle e2b-charts makes in the kernel), DataFrames as `result.data`
(`e2b/data`), and a Pillow image that is saved to a file is shown as a result too.

One sandbox serves the whole module (each test uses its own names in it): a kernel with
matplotlib and pandas loaded takes seconds to start on a busy machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2b_code_interpreter import Sandbox
from e2b_code_interpreter.charts import BarChart, ChartType, LineChart, PieChart
from fixtures.stack import Stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sandbox(coppice_stack: Stack) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(
        "code-interpreter-v1",
        **coppice_stack.sdk_options(),
        timeout=300,
    )
    try:
        yield sandbox
    finally:
        sandbox.kill()


def test_line_chart_has_title_axes_and_series(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.plot([0, 1, 2, 3], [0, 1, 4, 9], label='squares')\n"
        "ax.plot([0, 1, 2, 3], [0, 1, 8, 27], label='cubes')\n"
        "ax.set_title('Powers')\n"
        "ax.set_xlabel('n')\n"
        "ax.set_ylabel('value')\n"
        "ax.legend()\n"
        "plt.show()\n"
    )
    assert execution.error is None
    (result,) = execution.results
    assert result.png  # the inline backend's image is still there next to the chart
    chart = result.chart
    assert isinstance(chart, LineChart)
    assert chart.type == ChartType.LINE
    assert chart.title == "Powers"
    assert (chart.x_label, chart.y_label) == ("n", "value")
    series = {element.label: element.points for element in chart.elements}
    assert set(series) == {"squares", "cubes"}
    assert [y for _, y in series["cubes"]] == [0, 1, 8, 27]
    assert not result.extra  # e2b/chart is mapped to `chart`, not left over


def test_bar_chart_has_labelled_values(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.figure()\n"
        "plt.bar(['oak', 'ash', 'elm'], [12, 7, 3])\n"
        "plt.title('Coppiced stools')\n"
        "plt.ylabel('count')\n"
        "plt.show()\n"
    )
    assert execution.error is None
    chart = execution.results[0].chart
    assert isinstance(chart, BarChart)
    assert chart.type == ChartType.BAR
    assert chart.title == "Coppiced stools"
    assert chart.y_label == "count"
    assert {bar.label: bar.value for bar in chart.elements} == {"oak": 12, "ash": 7, "elm": 3}


def test_pie_chart_has_slices_with_angles(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.figure()\n"
        "plt.pie([1, 1, 2], labels=['left', 'right', 'rest'])\n"
        "plt.title('Shares')\n"
        "plt.show()\n"
    )
    assert execution.error is None
    chart = execution.results[0].chart
    assert isinstance(chart, PieChart)
    assert chart.type == ChartType.PIE
    assert chart.title == "Shares"
    angles = {piece.label: piece.angle for piece in chart.elements}
    assert set(angles) == {"left", "right", "rest"}
    assert angles["rest"] == pytest.approx(180)
    assert sum(angles.values()) == pytest.approx(360)


def test_dataframe_result_carries_its_columns(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(
        "import pandas as pd\n"
        "pd.DataFrame({'tree': ['oak', 'ash'], 'age': [40, 7],\n"
        "              'cut': pd.to_datetime(['2024-01-05', '2025-02-06'])})\n"
    )
    assert execution.error is None
    (result,) = execution.results
    assert result.is_main_result
    assert result.data == {
        "tree": ["oak", "ash"],
        "age": [40, 7],
        "cut": ["2024-01-05T00:00:00", "2025-02-06T00:00:00"],
    }
    assert result.html is not None  # the usual representations stay
    assert not result.extra


def test_plain_values_get_no_data_or_chart(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("[1, 2, 3]")
    (result,) = execution.results
    assert result.text == "[1, 2, 3]"
    assert result.data is None
    assert result.chart is None


def test_saving_an_image_shows_it(sandbox: Sandbox) -> None:
    execution = sandbox.run_code(
        "import io\n"
        "from PIL import Image\n"
        "image = Image.new('RGB', (8, 8), 'green')\n"
        "image.save(io.BytesIO(), 'PNG')\n"  # to a buffer: not shown
        "image.save('/tmp/green.png')\n"
        "print('saved')\n"
    )
    assert execution.error is None
    assert execution.logs.stdout == ["saved\n"]
    (result,) = execution.results
    assert result.png
    assert result.png.startswith("iVBORw0KGgo")  # base64 of the PNG signature
    assert not result.is_main_result
    assert sandbox.files.read("/tmp/green.png", format="bytes")[:4] == b"\x89PNG"


def test_showing_an_image_shows_it_as_a_result(sandbox: Sandbox) -> None:
    execution = sandbox.run_code("from PIL import Image\nImage.new('RGBA', (4, 4), 'red').show()\n")
    assert execution.error is None
    (result,) = execution.results
    assert result.png

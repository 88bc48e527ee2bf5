# Rich results for E2B's code-interpreter API, run by every python kernel as it starts (kernels.py
# passes it as IPKernelApp.exec_files). It runs INSIDE the sandbox, on the sandbox's python3, in
# the user's namespace: so it is one function, deleted once called, and comments rather than a
# docstring (which would become the user's `__doc__`). Nothing heavy is imported here: each part
# waits until user code has imported pandas, matplotlib or Pillow itself.
#
# - `e2b/data` (the SDK's `result.data`): a pandas DataFrame as {column: [values]}.
# - `e2b/chart` (`result.chart`): a matplotlib Figure as the `e2b-charts` package describes it
#   (type, title, axes, elements); the code-interpreter template installs it.
# - Pillow: `Image.save(path)` also shows the saved image as a result, and `Image.show()` always
#   shows it as a result (through Pillow's IPython viewer), never in a desktop viewer.


def _coppice_rich_display() -> None:
    import datetime
    import functools
    import importlib
    import importlib.abc
    import os
    import sys
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

    from IPython.core.formatters import BaseFormatter
    from IPython.core.getipython import get_ipython
    from traitlets import ObjectName, Unicode

    def cell_value(value: Any, pandas: ModuleType) -> Any:
        if value is pandas.NaT:
            return None
        if isinstance(value, datetime.date):  # pandas.Timestamp and datetime.datetime too
            return value.isoformat()
        return value

    class DataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict, str)

        def __call__(self, obj: Any) -> Any:
            pandas = sys.modules.get("pandas")  # no DataFrame can exist before pandas is imported
            if pandas is None or not isinstance(obj, pandas.DataFrame):
                return super().__call__(obj)
            try:
                columns = obj.to_dict(orient="list")
                # Keys as JSON keeps them: a tuple of a MultiIndex would fail to serialize.
                return {
                    (name if isinstance(name, str) else str(name)): [
                        cell_value(value, pandas) for value in values
                    ]
                    for name, values in columns.items()
                }
            except Exception:  # a bad frame must not cost the other formats of the result
                return None

    class ChartFormatter(BaseFormatter):
        format_type = Unicode("e2b/chart")
        print_method = ObjectName("_repr_e2b_chart_")
        _return_type = (dict, str)

        def __call__(self, obj: Any) -> Any:
            figure = sys.modules.get("matplotlib.figure")  # likewise for a Figure
            if figure is None or not isinstance(obj, figure.Figure):
                return super().__call__(obj)
            try:
                charts = importlib.import_module("e2b_charts")
                return charts.chart_figure_to_dict(obj)
            except Exception:  # no e2b-charts, or a figure it cannot read: png and text remain
                return None

    shell = get_ipython()
    if shell is None:
        return
    display_formatter = shell.display_formatter
    if display_formatter is None:
        return
    for formatter in (DataFormatter, ChartFormatter):
        display_formatter.formatters[formatter.format_type.default_value] = formatter(
            parent=display_formatter
        )

    def patch_image(module: ModuleType) -> None:
        from IPython.display import display as untyped_display

        display: Callable[[Any], object] = untyped_display
        save = module.Image.save

        @functools.wraps(save)
        def save_and_show(self: Any, fp: Any, *args: Any, **kwargs: Any) -> Any:
            saved = save(self, fp, *args, **kwargs)
            if isinstance(fp, str | os.PathLike):  # a file, not a buffer (as _repr_png_ uses)
                display(self)
            return saved

        module.Image.save = save_and_show

    def patch_image_show(module: ModuleType) -> None:
        # Viewer.show returning 0 means "not shown here": Pillow then tries the next viewer, its
        # IPython one. A desktop viewer (xdg-open, display, eog ...) has no screen in a sandbox.
        def decline(self: Any, image: Any, **options: Any) -> int:
            return 0

        module.UnixViewer.show = decline

    class PatchedLoader(importlib.abc.Loader):
        """Runs a module as its own loader would, then patches it; then steps aside."""

        def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]):
            self._loader = loader
            self._patch = patch

        def create_module(self, spec: ModuleSpec) -> ModuleType | None:
            return self._loader.create_module(spec)

        def exec_module(self, module: ModuleType) -> None:
            module.__loader__ = self._loader
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
            self._loader.exec_module(module)
            self._patch(module)

    class PatchOnImport(importlib.abc.MetaPathFinder):
        """Patches a module when (and if) user code imports it, which is why nothing here pays
        for importing Pillow at kernel start."""

        def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
            self._patches = patches

        def find_spec(
            self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
        ) -> ModuleSpec | None:
            patch = self._patches.get(fullname)
            if patch is None:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        del self._patches[fullname]  # once: a reload keeps the patched class
                        spec.loader = PatchedLoader(spec.loader, patch)
                    return spec
            return None

    patches: dict[str, Callable[[ModuleType], None]] = {
        "PIL.Image": patch_image,
        "PIL.ImageShow": patch_image_show,
    }
    for name, patch in list(patches.items()):
        if name in sys.modules:  # imported already (a startup file of the user's)
            patch(sys.modules[name])
            del patches[name]
    sys.meta_path.insert(0, PatchOnImport(patches))


_coppice_rich_display()
del _coppice_rich_display

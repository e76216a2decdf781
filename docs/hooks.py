"""MkDocs hooks (``mkdocs.yml: hooks``): the pages that are generated, not written.

* one page per method from the registries — every adapter of ``leantune.adapters.ADAPTERS`` and every optimizer of
  ``leantune.optim.OPTIMIZERS`` — its docstring rendered by mkdocstrings (formula, paper, options, defaults) and,
  for optimizers, the capabilities and state-bytes formula its spec carries; a new method gets its page by
  registering itself;
* ``architecture.md`` from ARCHITECTURE.md and the benchmark figures from ``benchmarks/results/`` (not copies);
* ``<!-- table: benchmarks/results/FILE.md#N -->`` in a page becomes the N-th table of that benchmark output, so
  the tables are the ones the benchmark commands wrote; a missing file or table fails the build.

Also keeps the console quiet without ``-q`` (``-q`` would hide the warnings ``--strict`` counts).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = re.compile(r"<!-- table: (\S+?)#(\d+) -->")

for _handler in logging.getLogger("mkdocs").handlers:
    if _handler.name == "MkDocsStreamHandler":
        _handler.setLevel(logging.WARNING)


def _adapters() -> dict[str, type]:
    import leantune  # noqa: F401  (registers the tuners)
    from leantune.adapters import ADAPTERS

    return {name: cls for name, cls in ADAPTERS.items() if cls.__module__.startswith("leantune")}


def _optimizers() -> dict:
    from leantune.optim import OPTIMIZERS

    return OPTIMIZERS


def _render(identifier: str, first_page: dict[str, str], page: str, here: str) -> str:
    """mkdocstrings' ``::: identifier`` on the first page that shows it; a link to that page on later ones (one
    object, one anchor)."""
    if identifier in first_page:
        name = identifier.rsplit(".", 1)[-1]
        return f"`{name}` is documented on [{Path(first_page[identifier]).stem}]({first_page[identifier]}).\n"
    first_page[identifier] = f"../{page}"
    return f"::: {identifier}\n    options:\n      show_root_heading: false\n      members: false\n"


def _adapter_page(name: str, cls: type, seen: dict[str, str]) -> str:
    page = f"adapters/{name}.md"
    return (f"# {name}\n\n`{cls.__name__}` — `leantune plan --adapter {name}`, "
            f"`LeanTuneCallback(adapter={cls.__name__}(...))`, `get_peft_model(model, {cls.__name__}(...))`.\n\n"
            + _render(cls.__module__, seen, page, name) + "\n## Options\n\n"
            + _render(f"{cls.__module__}.{cls.__name__}", seen, page, name))


def _optimizer_page(name: str, spec, seen: dict[str, str]) -> str:
    import torch

    rank = "none (full basis)" if spec.rank is None else (f"{spec.rank} (fixed)" if spec.fixed_rank else spec.rank)
    rows = [("summary", spec.summary), ("class", f"`{spec.cls.__name__}`"), ("projector", spec.projector or "–"),
            ("default rank", rank), ("default scale α", spec.scale), ("default refresh gap T", spec.update_proj_gap),
            ("Adam options (betas, eps)", "yes" if spec.adam else "no"),
            ("FSDP2 (row-shardable)", "yes" if spec.row_shardable else "no: use DDP"),
            ("fused CUDA step", "yes" if spec.fusable else "no"), ("fp16 parameters", "yes" if spec.fp16 else "no"),
            ("moment policies at a refresh", ", ".join(spec.moment_policies)),
            ("8-bit moments", "yes" if spec.eight_bit else "no")]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    example = spec.state_bytes((4096, 11008), 1024, torch.bfloat16)
    return (f"# {name}\n\n`OptimizerConfig(\"{name}\")`, `LeanTuneCallback(optimizer=\"{name}\")`, "
            f"`leantune plan --optimizer {name}`.\n\n| | |\n|---|---|\n{table}\n\n"
            f"State bytes (the formula the planner uses, checked against the built optimizer in "
            f"`tests/optim/test_spec.py`): e.g. a 4096 × 11008 bf16 matrix at rank 1024 keeps "
            f"{example / 2**20:.1f} MiB; the formulas of every optimizer are on the "
            f"[optimizers overview](../optimizers.md#state-bytes).\n\n## Update rule\n\n"
            + _render(f"{spec.cls.__module__}.{spec.cls.__name__}", seen, f"optimizers/{name}.md", name))


def _pages() -> dict[str, str]:
    seen: dict[str, str] = {}
    pages = {f"methods/adapters/{n}.md": _adapter_page(n, c, seen) for n, c in sorted(_adapters().items())}
    # the SVD-projected entry of a class first, so a class shared by several names is documented on its own name
    names = sorted(_optimizers().items(), key=lambda item: (item[1].projector not in ("svd", None), item[0]))
    pages.update({f"methods/optimizers/{n}.md": _optimizer_page(n, s, seen) for n, s in names})
    pages["architecture.md"] = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    return pages


def on_config(config):
    """Method pages go into the nav under Methods (after the hand-written overviews)."""
    for section in config["nav"]:
        if isinstance(section, dict) and "Methods" in section:
            section["Methods"] += [
                {"Adapter methods": [{n: f"methods/adapters/{n}.md"} for n in sorted(_adapters())]},
                {"Optimizer methods": [{n: f"methods/optimizers/{n}.md"} for n in sorted(_optimizers())]},
            ]
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for uri, content in _pages().items():
        files.append(File.generated(config, uri, content=content))
    for image in sorted((ROOT / "benchmarks" / "results").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/results/{image.name}", abs_src_path=str(image)))
    return files


def _table(path: str, index: int) -> str:
    from mkdocs.exceptions import PluginError

    source = ROOT / path
    if not source.is_file():
        raise PluginError(f"docs: {path} (a benchmark output) does not exist")
    tables, current = [], []
    for line in source.read_text(encoding="utf-8").split("\n") + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    if not 1 <= index <= len(tables):
        raise PluginError(f"docs: {path} has {len(tables)} tables, not a table #{index}")
    return tables[index - 1] + f"\n\n<small>Table written by the benchmark: `{path}`.</small>"


def on_page_markdown(markdown, page, config, files):
    return TABLE.sub(lambda m: _table(m.group(1), int(m.group(2))), markdown)

"""``f3export inspect``: the temporal attention modules of a recipe's model, or of a finished build (from its
recorded plan, with no model loaded)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .artifacts import open_build
from .errors import CheckError
from .report import plural, table


@dataclass(frozen=True)
class Module:
    name: str
    heads: int
    kept: int | None = None  # a build's: heads left after pruning
    head_dim: int | None = None  # a recipe's model
    parameters: int | None = None


@dataclass(frozen=True)
class Inspection:
    title: str
    modules: list[Module]
    model_parameters: int | None = None

    def document(self) -> dict:
        return {"title": self.title, "modules": [{k: v for k, v in vars(m).items() if v is not None}
                                                 for m in self.modules],
                "heads": sum(m.heads for m in self.modules),
                **({"kept": sum(m.kept for m in self.modules)} if self.modules and self.modules[0].kept is not None
                   else {}),
                **({"model_parameters": self.model_parameters} if self.model_parameters else {})}

    def table(self):
        heads = sum(m.heads for m in self.modules)
        if self.model_parameters is None:  # a build: what pruning kept
            kept = sum(m.kept for m in self.modules)
            result = table(self.title, ["module", "heads", "kept"],
                           [[m.name, str(m.heads), str(m.kept)] for m in self.modules])
            result.caption = f"{plural(len(self.modules), 'module')}, {kept} of {plural(heads, 'head')} kept"
            return result
        total = sum(m.parameters for m in self.modules)
        result = table(self.title, ["module", "heads", "head dim", "parameters"],
                       [[m.name, str(m.heads), str(m.head_dim), f"{m.parameters:,}"] for m in self.modules])
        result.caption = (f"{plural(len(self.modules), 'module')}, {plural(heads, 'head')}, {total:,} of "
                          f"{self.model_parameters:,} parameters ({100 * total / self.model_parameters:.1f}%)")
        return result


def inspect_recipe(recipe_path: Path, overrides: list[str]) -> Inspection:
    from .build import Build
    from .recipe import load_recipe

    build = Build(load_recipe(recipe_path, overrides))
    model = build.model.bundle.model
    modules = []
    for site in build.adapter.structure.temporal_sites(model):
        heads = site.heads_of(model)
        parts = [heads.module] + ([model.get_submodule(site.own_norm)] if site.own_norm else [])
        modules.append(Module(site.attention, heads.heads, head_dim=heads.head_dim,
                              parameters=sum(p.numel() for m in parts for p in m.parameters())))
    return Inspection(f"{build.recipe.model.family}: temporal attention modules", modules,
                      sum(p.numel() for p in model.parameters()))


def inspect_build(root: Path) -> Inspection:
    """From the build's verified ``plan.json``: every temporal module, its heads and how many pruning kept."""
    build = open_build(root)
    build.verify_files(("plan",))
    path = root / "plan.json"
    try:
        plan = json.loads(path.read_text())
        heads, removed = plan["heads"], plan["removed"]
        modules = [Module(name, int(count), int(count) - len(removed.get(name, []))) for name, count in heads.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CheckError(f"{path}: not a plan of this build (heads and removed per module)") from None
    return Inspection(f"{build.doc.get('name', root.name)}: temporal attention modules after pruning", modules)

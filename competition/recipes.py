"""The defaults a run starts from, by what it is: Carvana's own, else by encoder, classes and data size.

TrainConfig's defaults are Carvana's winners' recipe (an ImageNet encoder, one large class, 5,088 images). A model
trained from scratch on a few hundred multi-class images wants other ones; the rule below, measured by
bench/recipe_bench.py and stated in the README, picks them. A setting given by a flag or a config file always wins,
and ``--recipe carvana`` keeps TrainConfig's defaults for any data.
"""

import logging
from dataclasses import dataclass, replace

from competition.config import TrainConfig, flag, given_settings, resolve_config
from competition.layouts import open_data_as

logger = logging.getLogger(__name__)

SMALL_DATA = 2000  # labelled images: a set with fewer is small
SCRATCH_LR = 2e-3  # AdamW's peak rate for an encoder trained from scratch (pretrained ones keep 3e-4)


@dataclass(frozen=True)
class Situation:
    """What the rule looks at: the layout's fixed classes (Carvana's), the encoder's weights, the classes, the
    labelled images (every fold's)."""

    carvana: bool
    pretrained: bool
    classes: int
    labelled_images: int
    multilabel: bool = False  # one sigmoid channel per class (--head multilabel): no softmax class weights

    @property
    def small(self) -> bool:
        return self.labelled_images < SMALL_DATA

    def describe(self) -> str:
        if self.carvana:
            return "Carvana"
        return ", ".join(
            (
                "pretrained encoder" if self.pretrained else "from scratch",
                f"{self.classes} labels (multilabel)"
                if self.multilabel
                else f"{self.classes} classes"
                if self.classes > 2
                else "binary",
                f"{'small' if self.small else 'large'} data ({self.labelled_images} labelled images)",
            )
        )


def situation_of(config: TrainConfig, data) -> Situation:
    """The run's situation: ``data`` is its data folder as opened with its settings (classes resolved)."""
    return Situation(
        carvana=data.fixed_classes,
        pretrained=config.encoder_weights.strip().lower() != "none",
        classes=data.num_classes,
        labelled_images=len(data.train_ids()),
        multilabel=config.multilabel(),
    )


def recipe(situation: Situation) -> dict[str, object]:
    """The settings the rule gives ``situation``; those it leaves out keep TrainConfig's defaults (Carvana's)."""
    if situation.carvana:
        return {}
    settings: dict[str, object] = {}
    if not situation.pretrained:  # nothing learnt to keep: a rate 7x higher, one-cycle, as the bench chose
        settings.update(lr=SCRATCH_LR, schedule="onecycle")
        if situation.small:  # a short run from scratch underfits: flips alone let it learn the classes first
            settings["augment"] = "flip"
    # thin and rare classes (poles, cyclists) predicted: the bench's rare-class option; softmax classes alone
    if situation.classes > 2 and not situation.multilabel:
        settings["class_weights"] = "median"
    return settings


def _described(settings: dict[str, object]) -> str:
    return ", ".join(
        f"{flag(name)} {value:g}" if isinstance(value, float) else f"{flag(name)} {value}"
        for name, value in settings.items()
    )


def with_recipe(config: TrainConfig, given: set[str], data) -> TrainConfig:
    """``config`` with the recipe of its situation in every setting not in ``given`` (named by a flag or the config
    file), said in one line."""
    if config.recipe == "carvana":
        logger.info("recipe: carvana, the defaults whatever the data (--recipe auto picks them by situation)")
        return replace(config, recipe_applied="")  # a reused config.json of an auto run may name some
    situation = situation_of(config, data)
    chosen = recipe(situation)
    applied = {name: value for name, value in chosen.items() if name not in given}
    kept = [name for name in chosen if name in given]
    logger.info(
        "recipe for %s: %s%s (README: Defaults by situation)",
        situation.describe(),
        _described(applied) or "the defaults",
        f"; as given: {', '.join(flag(name) for name in kept)}" if kept else "",
    )
    return replace(config, **applied, recipe_applied=",".join(applied))


def resolve_run_config(args, also_given: tuple[str, ...] = ()) -> TrainConfig:
    """A run's settings: defaults, config file and flags (``resolve_config``), then the recipe of its situation
    in what none of them named (nor ``also_given``: ``--lr auto`` is train.py's to resolve)."""
    config = resolve_config(args)
    return with_recipe(config, given_settings(args) | set(also_given), open_data_as(config))

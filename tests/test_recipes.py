"""The defaults by situation: the rule as a pure function, given settings winning, the command line's resolution on
real folders (Carvana's kept to the bit), and the settings files of before (augment as a bool) still read."""

import logging
from dataclasses import asdict, replace
from types import SimpleNamespace

import pytest

import make_folds
import train
from competition.checkpoints import FORMAT_VERSION, check_resumable
from competition.config import RECIPE_SETTINGS, TrainConfig, config_from, given_settings
from competition.errors import ConfigError
from competition.recipes import SCRATCH_LR, SMALL_DATA, Situation, recipe, resolve_run_config, with_recipe
from tests.layout_fixtures import make_folders


def situation(carvana=False, pretrained=False, classes=5, images=300):
    return Situation(carvana=carvana, pretrained=pretrained, classes=classes, labelled_images=images)


def test_carvana_keeps_its_winners_recipe_whatever_the_encoder():
    assert recipe(situation(carvana=True, classes=2, images=80)) == {}
    assert recipe(situation(carvana=True, pretrained=True, classes=2, images=5088)) == {}


def test_a_pretrained_encoder_on_large_binary_data_keeps_the_defaults():
    assert recipe(situation(pretrained=True, classes=2, images=SMALL_DATA)) == {}


def test_from_scratch_trains_faster_and_small_data_from_scratch_flips_alone():
    small = recipe(situation(classes=2, images=SMALL_DATA - 1))
    assert small == {"lr": SCRATCH_LR, "schedule": "onecycle", "augment": "flip"}
    large = recipe(situation(classes=2, images=SMALL_DATA))
    assert large == {"lr": SCRATCH_LR, "schedule": "onecycle"}  # full augmentation, the default


def test_multi_class_data_weighs_its_rare_classes():
    assert recipe(situation(pretrained=True, classes=3, images=10_000)) == {"class_weights": "median"}
    assert recipe(situation(classes=12))["class_weights"] == "median"
    assert "class_weights" not in recipe(situation(classes=2))


def fake_data(classes=5, images=300, fixed=False):
    return SimpleNamespace(fixed_classes=fixed, num_classes=classes, train_ids=lambda: [str(i) for i in range(images)])


def test_given_settings_win_and_the_line_says_which_rule_applied(caplog):
    config = TrainConfig(encoder_weights="none", lr=5e-4, augment="full")
    with caplog.at_level(logging.INFO, logger="competition.recipes"):
        chosen = with_recipe(config, {"lr", "augment", "encoder_weights"}, fake_data())
    assert (chosen.lr, chosen.augment) == (5e-4, "full")  # given
    assert (chosen.schedule, chosen.class_weights) == ("onecycle", "median")  # the rule's
    line = caplog.records[-1].getMessage()
    assert "from scratch, 5 classes, small data (300 labelled images)" in line
    assert "--schedule onecycle, --class-weights median" in line and "as given: --lr, --augment" in line


def test_recipe_carvana_keeps_the_defaults_for_any_data(caplog):
    config = TrainConfig(encoder_weights="none", recipe="carvana")
    with caplog.at_level(logging.INFO, logger="competition.recipes"):
        assert with_recipe(config, set(), fake_data(classes=12)) == config
    assert "recipe: carvana" in caplog.text


def test_the_settings_given_are_the_config_files_and_the_flags(tmp_path):
    settings = tmp_path / "run.toml"
    settings.write_text('schedule = "cosine"\nepochs = 3\n')
    args = train.build_parser().parse_args(["--config", str(settings), "--lr", "1e-3"])
    assert given_settings(args) == {"schedule", "epochs", "lr"}


def test_train_py_resolves_a_folder_set_from_scratch_by_the_rule(tmp_path, data_dir):
    folders = make_folders(tmp_path / "shapes")
    args = train.build_parser().parse_args(
        ["--data-dir", str(folders), "--encoder-weights", "none", "--augment", "none"]
    )
    config = resolve_run_config(args)
    assert (config.lr, config.schedule, config.augment, config.class_weights) == (
        SCRATCH_LR,
        "onecycle",
        "none",
        "median",
    )
    carvana = resolve_run_config(
        train.build_parser().parse_args(["--data-dir", str(data_dir), "--encoder-weights", "none"])
    )
    defaults = TrainConfig()
    assert (carvana.lr, carvana.schedule, carvana.augment, carvana.class_weights) == (
        defaults.lr,
        defaults.schedule,
        defaults.augment,
        defaults.class_weights,
    )


@pytest.mark.parametrize(("saved", "level"), [(True, "full"), (False, "none")])
def test_a_saved_augment_switch_reads_as_its_level(saved, level):
    assert config_from({"augment": saved}).augment == level


def test_make_folds_writes_the_folds_file_its_config_names(tmp_path, monkeypatch):
    folders = make_folders(tmp_path / "shapes")
    settings = tmp_path / "shapes.toml"
    settings.write_text(f'data_dir = "{folders}"\nfolds_csv = "{tmp_path / "folds" / "shapes.csv"}"\n')
    make_folds.main(["--config", str(settings), "--n-folds", "2", "--quiet"])
    assert (tmp_path / "folds" / "shapes.csv").is_file()


def test_the_rule_picks_only_the_settings_a_run_of_before_goes_on_with():
    situations = [Situation(False, pretrained, classes, images) for pretrained in (True, False)
                  for classes in (2, 5) for images in (10, SMALL_DATA)]  # fmt: skip
    assert set().union(*(recipe(situation) for situation in situations)) == set(RECIPE_SETTINGS)


def checkpoint_of(config: TrainConfig, before_the_rule: bool) -> dict:
    saved = asdict(config)
    if before_the_rule:
        del saved["recipe"]
    return {"format": FORMAT_VERSION, "config": saved}


def test_a_run_begun_before_the_rule_resumes_with_the_settings_it_began_with(tmp_path, caplog):
    begun = TrainConfig(encoder_weights="none", classes="a,b,c", fold=0)
    now = replace(begun, lr=SCRATCH_LR, schedule="onecycle", augment="flip", class_weights="median")
    with caplog.at_level(logging.INFO, logger="competition"):
        check_resumable(checkpoint_of(begun, before_the_rule=True), now, tmp_path / "last.pt")
    assert (now.lr, now.schedule, now.augment, now.class_weights) == (begun.lr, "cosine", "full", "none")
    assert "was begun before the defaults by situation: it goes on with the settings it began with (lr 0.0003" in (
        caplog.text
    )
    again = replace(begun, lr=SCRATCH_LR)
    with pytest.raises(ConfigError, match="was trained with lr=0.0003, now 0.002"):  # begun under the rule: as before
        check_resumable(checkpoint_of(begun, before_the_rule=False), again, tmp_path / "last.pt")


def test_a_run_begun_under_an_earlier_rule_goes_on_with_what_that_rule_chose(tmp_path, caplog):
    chosen = "lr,schedule,augment,class_weights"
    begun = TrainConfig(encoder_weights="none", classes="a,b,c", class_weights="median", recipe_applied=chosen)
    now = replace(begun, class_weights="enet")  # the rule picks another weighting today
    with caplog.at_level(logging.INFO, logger="competition"):
        check_resumable(checkpoint_of(begun, before_the_rule=False), now, tmp_path / "last.pt")
    assert now.class_weights == "median"
    assert "begun under an earlier rule of the defaults by situation" in caplog.text and "class_weights median" in (
        caplog.text
    )
    edited = replace(begun, recipe_applied="lr,nonsense,class_weights")  # a hand-edited file: its stray name unread
    check_resumable(checkpoint_of(edited, before_the_rule=False), replace(now, class_weights="enet"), tmp_path / "x")
    given = replace(begun, class_weights="enet", recipe_applied="lr,schedule,augment")  # --class-weights enet given
    with pytest.raises(ConfigError, match="was trained with class_weights='median', now 'enet'"):
        check_resumable(checkpoint_of(begun, before_the_rule=False), given, tmp_path / "last.pt")


def test_the_config_names_the_settings_the_rule_chose():
    config = with_recipe(TrainConfig(encoder_weights="none", augment="full"), {"augment"}, fake_data())
    assert set(config.recipe_applied.split(",")) == set(RECIPE_SETTINGS) - {"augment"}
    carvana = replace(config, recipe="carvana")
    assert with_recipe(carvana, set(), fake_data()).recipe_applied == ""  # the rule chose nothing

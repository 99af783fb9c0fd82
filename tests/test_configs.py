"""anovl.configs: the one walk over a command line's model options (model_events) and the two answers the CLI
takes from it (chooses_model_first: is AnoVL put first; model_settings_by_class: which settings carry over)."""

import pytest

from anovl.configs import (
    ClassChosen,
    OtherModelOption,
    SettingGiven,
    chooses_model_first,
    model_events,
    model_settings_by_class,
)
from anovl.errors import AnovlError

C, S, O = ClassChosen, SettingGiven, OtherModelOption
DATASET_CONFIG = "model: {class_path: anovl, init_args: {backbone: my-vit, num_views: 3}}\ndata: {init_args: {}}\n"

# (command line, the events in order, chooses_model_first, model_settings_by_class), all written out by hand.
# "FILE" stands for a config file holding DATASET_CONFIG.
WALKS = {
    "nothing": ([], [], False, {}),
    "no model option": (["test", "--data.init_args.root", "x"], [], False, {}),
    "a name": (["test", "--model", "winclip"], [C("winclip")], True, {}),
    "a name after =": (["--model=winclip"], [C("winclip")], True, {}),
    "a class path": (["--model", "anovl.models.AnoVL"], [C("anovl.models.AnoVL")], True, {}),
    "--model.class_path": (["--model.class_path", "aprilgan"], [C("aprilgan")], True, {}),
    "--model.class_path= taken as given": (["--model.class_path=.odd"], [C(".odd")], True, {}),
    "a setting, then a class": (
        ["--model.init_args.k_shot", "2", "--model", "winclip"],
        [S("k_shot"), C("winclip")],
        False,
        {"k_shot": None},
    ),
    "a class, then settings": (
        ["--model", "aprilgan", "--model.init_args.k_shot=2", "--model.backbone", "x"],
        [C("aprilgan"), S("k_shot"), S("backbone")],
        True,
        {"k_shot": "aprilgan", "backbone": "aprilgan"},
    ),
    "a nested setting is its first name": (
        ["--model.init_args.tta.mode", "independent"],
        [S("tta")],
        False,
        {"tta": None},
    ),
    "a mapping: class, then its init_args in order": (
        ["--model", "{class_path: winclip, init_args: {scales: [2], k: 1}}"],
        [C("winclip"), S("scales"), S("k")],
        True,
        {"scales": "winclip", "k": "winclip"},
    ),
    "a mapping without class_path": (
        ["--model", "winclip", "--model", "{init_args: {num_views: 3}}"],
        [C("winclip"), S("num_views")],
        True,
        {"num_views": "winclip"},
    ),
    "a mapping whose class_path is null": (["--model", "{class_path: null}"], [C(None)], True, {}),
    "--model .init_args.NAME VALUE": (["--model", ".init_args.num_views", "3"], [O("--model")], False, {}),
    "--model with a value that is not YAML": (["--model", "[unclosed"], [O("--model")], False, {}),
    "--model.help before a class": (
        ["--model.help", "anovl", "--model", "winclip"],
        [O("--model.help"), C("winclip")],
        False,
        {},
    ),
    "--model.help=": (["--model.help=winclip"], [O("--model.help")], False, {}),
    # As jsonargparse reads it, --model.init_args takes a mapping; the walk names the option itself.
    "--model.init_args VALUE": (["--model.init_args", "{k: 1}"], [S("init_args")], False, {"init_args": None}),
    "an option without a value": (["--model.init_args.k"], [], False, {}),
    "inline config, a name": (["--config", "model: anovl"], [C("anovl")], True, {}),
    "inline config after =": (["--config=model: {class_path: x.Y}"], [C("x.Y")], True, {}),
    "inline config, settings without a class": (
        ["-c", "model: {init_args: {num_views: 3}}"],
        [S("num_views")],
        False,
        {"num_views": None},
    ),
    "inline config, model with nothing": (["-c", "model: {init_args: {}}"], [O("-c")], False, {}),
    "inline config, model null": (["--config", "model: null"], [O("--config")], False, {}),
    "a config without model:": (["--config", "data: {init_args: {batch_size: 2}}"], [], False, {}),
    "a config file, then another class and a setting": (
        ["test", "--config", "FILE", "--model", "aprilgan", "--model.init_args.k_shot", "2"],
        [C("anovl"), S("backbone"), S("num_views"), C("aprilgan"), S("k_shot")],
        True,
        {"backbone": "anovl", "num_views": "anovl", "k_shot": "aprilgan"},
    ),
    "a setting given again under another class": (
        ["--model", "anovl", "--model.init_args.backbone", "x", "--model", "winclip", "--model.backbone", "y"],
        [C("anovl"), S("backbone"), C("winclip"), S("backbone")],
        True,
        {"backbone": "winclip"},
    ),
}


@pytest.mark.parametrize("name", list(WALKS))
def test_the_walk_over_the_model_options(name, tmp_path):
    command_line, events, first, settings = WALKS[name]
    config = tmp_path / "dataset.yaml"
    config.write_text(DATASET_CONFIG)
    command_line = [str(config) if argument == "FILE" else argument for argument in command_line]
    assert list(model_events(command_line)) == events
    assert chooses_model_first(command_line) is first
    assert model_settings_by_class(command_line) == settings


def test_the_walk_reads_a_config_file_only_when_it_gets_there(tmp_path):
    # A key given twice is an error of the bounded reader: reached only where the walk goes on past a choice.
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: anovl\nmodel: winclip\n")
    command_line = ["--model", "winclip", "--config", str(broken)]
    assert chooses_model_first(command_line)
    with pytest.raises(AnovlError, match="broken.yaml"):
        model_settings_by_class(command_line)

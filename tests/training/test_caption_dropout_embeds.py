"""--caption_dropout_embeds: what a caption dropped by --caption_dropout becomes. SDXL inference (diffusers' SDXL
pipelines and ours, ``force_zeros_for_empty_prompt``) sends zero prompt embeds and zero pooled embeds as the
unconditional half when no negative prompt is given; a dropped caption was always the text "" through the encoders,
an unconditional input that SDXL sampling never sends. ``zeros`` trains on what sampling sends, ``encoded`` on "";
unset, the base's own convention (SDXL: zeros, SD1.5: encoded) is used and recorded."""

import json
from pathlib import Path

import pytest
import torch

from brushnet.models.brushnet import BrushNetModel
from brushnet.training import loop
from brushnet.training.config import ConfigError, load_config_file, make_config, parse_train_args
from brushnet.training.entry import main

CAPTIONS = ["a red ball", "a blue cube", "a green cone"]
DROPPED = [True, False, True]  # caption dropout 0.5 with a generator seeded 0 (one draw per caption)


@pytest.fixture(scope="module")
def xl(tiny_xl_models):
    components = loop.load_components(str(tiny_xl_models["base"]))
    return components, BrushNetModel.from_unet(components.unet)


def _batch():
    return {
        "pixel_values": torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1,
        "mask": torch.zeros(3, 1, 16, 16).index_fill_(2, torch.arange(4, 12), 1.0),
        "caption": list(CAPTIONS),
        "original_size": torch.tensor([[480, 640], [512, 512], [1365, 2047]]),
        "crop_top_left": torch.tensor([[0, 53], [10, 0], [683, 301]]),
    }


def _seen(xl, monkeypatch, **options):
    """What the branch and the UNet receive in one loss with caption dropout 0.5 (generator seeded 0)."""
    components, brushnet = xl
    seen = {}
    hook = brushnet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(
            branch=(kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"])
        ),
        with_kwargs=True,
    )
    forward = loop.unet_forward_with_brushnet

    def record_unet(unet, sample, timestep, hidden_states, *rest, **kwargs):
        seen["unet"] = (hidden_states, kwargs["added_cond_kwargs"])
        return forward(unet, sample, timestep, hidden_states, *rest, **kwargs)

    monkeypatch.setattr(loop, "unet_forward_with_brushnet", record_unet)
    try:
        assert (torch.rand(3, generator=torch.Generator().manual_seed(0)) < 0.5).tolist() == DROPPED
        with torch.no_grad():
            loop.brushnet_training_loss(
                brushnet,
                components,
                _batch(),
                torch.Generator().manual_seed(0),
                caption_dropout=0.5,
                **options,
            )
    finally:
        hook.remove()
    return seen


def test_zeros_a_dropped_caption_reaches_the_unet_and_the_branch_as_exact_zeros(xl, monkeypatch):
    components, _ = xl
    batch = _batch()
    seen = _seen(xl, monkeypatch, caption_dropout_embeds="zeros")
    captions, added = components.family.encode(CAPTIONS, "cpu", torch.float32, batch)
    dropped, kept = torch.tensor(DROPPED), ~torch.tensor(DROPPED)
    for name in ("unet", "branch"):
        hidden_states, added_cond_kwargs = seen[name]
        text_embeds = added_cond_kwargs["text_embeds"]
        assert torch.equal(hidden_states[dropped], torch.zeros_like(hidden_states[dropped])), name
        assert torch.equal(text_embeds[dropped], torch.zeros_like(text_embeds[dropped])), name
        assert torch.equal(hidden_states[kept], captions[kept]), name  # a kept caption is untouched
        assert torch.equal(text_embeds[kept], added["text_embeds"][kept]), name
        # the time ids are the sample's own, dropped or not
        assert torch.equal(added_cond_kwargs["time_ids"], components.family.time_ids(batch).float()), name


def test_encoded_a_dropped_caption_is_the_encoding_of_the_empty_text(xl, monkeypatch):
    components, _ = xl
    batch = _batch()
    seen = _seen(xl, monkeypatch, caption_dropout_embeds="encoded")
    texts = ["" if drop else caption for caption, drop in zip(CAPTIONS, DROPPED)]
    expected, added = components.family.encode(texts, "cpu", torch.float32, batch)
    empty, empty_added = components.family.encode([""], "cpu", torch.float32, batch)
    assert empty.abs().max() > 0 and empty_added["text_embeds"].abs().max() > 0  # "" does not encode to zeros
    for name in ("unet", "branch"):
        hidden_states, added_cond_kwargs = seen[name]
        assert torch.equal(hidden_states, expected), name
        assert torch.equal(added_cond_kwargs["text_embeds"], added["text_embeds"]), name
        torch.testing.assert_close(hidden_states[0], empty[0])
        assert torch.equal(added_cond_kwargs["time_ids"], added["time_ids"]), name


def test_without_caption_dropout_the_loss_is_the_same_whatever_the_option(xl, tiny_base):
    """Nothing is drawn or zeroed at caption dropout 0: the option changes nothing, on either family."""
    for components, brushnet in (xl, _sd15(tiny_base)):
        batch = _batch()
        with torch.no_grad():
            losses = [
                loop.brushnet_training_loss(
                    brushnet, components, batch, torch.Generator().manual_seed(0), **options
                ).item()
                for options in (
                    {},
                    {"caption_dropout_embeds": "encoded"},
                    {"caption_dropout_embeds": "zeros"},
                )
            ]
        assert losses[0] == losses[1] == losses[2]
        with torch.no_grad():  # and at dropout 0.5 the two choices differ (the test above sees why)
            encoded, zeros = (
                loop.brushnet_training_loss(
                    brushnet, components, batch, torch.Generator().manual_seed(0), caption_dropout=0.5,
                    caption_dropout_embeds=choice,
                ).item()
                for choice in ("encoded", "zeros")
            )  # fmt: skip
        assert encoded != zeros


def test_the_guidance_terms_unconditional_half_is_what_a_dropped_caption_becomes(xl, tiny_base, monkeypatch):
    """The kept-invariance, guided and anchor terms run the UNet on guidance's unconditional half; it was the
    family's fixed one (SD1.5 encoded, SDXL zeros) whatever ``caption_dropout_embeds`` said, so a run trained a
    dropped caption as one input and the terms' unconditional half as another. It follows the option now; unset,
    the family's pipeline default (SDXL zeros, SD1.5 encoded)."""
    batch = _batch()
    for components, brushnet in (xl, _sd15(tiny_base)):
        empty, _ = components.family.encode([""] * 3, "cpu", torch.float32, batch)
        default = "zeros" if components.family.name == "sdxl" else "encoded"
        for option in ("zeros", "encoded", None):
            options = {} if option is None else {"caption_dropout_embeds": option}
            seen = _seen((components, brushnet), monkeypatch, kept_invariance_weight=1.0, **options)
            hidden_states, added = seen["unet"]
            assert hidden_states.shape[0] == 6, components.family.name  # [sample; unconditional]
            unconditional, dropped = hidden_states[3:], hidden_states[:3][torch.tensor(DROPPED)]
            zeros = (option or default) == "zeros"
            expected = torch.zeros_like(empty) if zeros else empty
            torch.testing.assert_close(unconditional, expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(dropped, expected[:2], rtol=0, atol=1e-6)  # one input, not two
            if added is not None:  # SDXL's pooled text too
                assert bool((added["text_embeds"][3:] == 0).all()) == zeros
        # --unconditional_embeds sets the terms' half apart from a dropped caption's
        seen = _seen(
            (components, brushnet),
            monkeypatch,
            kept_invariance_weight=1.0,
            caption_dropout_embeds="encoded",
            unconditional_embeds="zeros",
        )
        hidden_states = seen["unet"][0]
        assert not hidden_states[3:].any()
        torch.testing.assert_close(hidden_states[:3][torch.tensor(DROPPED)], empty[:2], rtol=0, atol=1e-6)


def _sd15(tiny_base):
    components = loop.load_components(str(tiny_base))
    return components, BrushNetModel.from_unet(components.unet)


def test_a_whole_sdxl_run_with_caption_dropout_0_is_the_same_whatever_the_option(
    base_config, tiny_xl_models, tmp_path
):
    values = {
        **base_config,
        "pretrained_model_name_or_path": str(tiny_xl_models["base"]),
        "caption_dropout": 0.0,
        "max_train_steps": 2,
    }
    losses = [
        loop.train(
            make_config({**values, "output_dir": str(tmp_path / choice), "caption_dropout_embeds": choice})
        ).losses
        for choice in ("encoded", "zeros")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def _recorded_run(values, monkeypatch) -> tuple[list[str], str]:
    """Train one step; return the caption_dropout_embeds each training loss got and the one train_config.yaml
    records."""
    used = []
    loss = loop.brushnet_training_loss

    def recording(*args, **kwargs):
        used.append(kwargs["caption_dropout_embeds"])
        return loss(*args, **kwargs)

    monkeypatch.setattr(loop, "brushnet_training_loss", recording)
    config = make_config({**values, "max_train_steps": 1})
    loop.train(config)
    return used, load_config_file(Path(config.output_dir) / "train_config.yaml")["caption_dropout_embeds"]


def test_unset_on_sdxl_base_1_0s_setting_is_zeros_and_is_recorded(base_config, tiny_xl_models, monkeypatch):
    base = tiny_xl_models["base"]
    assert json.loads((base / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    assert make_config(base_config).caption_dropout_embeds is None and base_config["caption_dropout"] > 0
    used, recorded = _recorded_run({**base_config, "pretrained_model_name_or_path": str(base)}, monkeypatch)
    assert used == ["zeros"] and recorded == "zeros"


def test_unset_on_sd15_is_encoded_and_zeros_is_accepted(base_config, monkeypatch, tmp_path):
    used, recorded = _recorded_run(base_config, monkeypatch)
    assert used == ["encoded"] and recorded == "encoded"
    values = {**base_config, "output_dir": str(tmp_path / "zeros"), "caption_dropout_embeds": "zeros"}
    used, recorded = _recorded_run(values, monkeypatch)
    assert used == ["zeros"] and recorded == "zeros"  # a research choice: it mismatches SD1.5 inference


def test_the_default_follows_the_bases_force_zeros_for_empty_prompt(tmp_path):
    from brushnet.training.family import dropped_caption_default

    def base(name, index):
        folder = tmp_path / name
        folder.mkdir()
        if index is not None:
            (folder / "model_index.json").write_text(json.dumps(index))
        return str(folder)

    sdxl = {"_class_name": "StableDiffusionXLPipeline"}
    assert (
        dropped_caption_default("sdxl", base("true", {**sdxl, "force_zeros_for_empty_prompt": True}))
        == "zeros"
    )
    assert (
        dropped_caption_default("sdxl", base("false", {**sdxl, "force_zeros_for_empty_prompt": False}))
        == "encoded"
    )
    # no key, no model_index.json (a folder of components), a single file: the SDXL pipelines' default, true
    assert dropped_caption_default("sdxl", base("no-key", sdxl)) == "zeros"
    assert dropped_caption_default("sdxl", base("no-index", None)) == "zeros"
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert dropped_caption_default("sdxl", str(tmp_path / "model.safetensors")) == "zeros"
    # SD1.5 encodes "" whatever the file says
    assert dropped_caption_default("sd15", base("sd15", {"force_zeros_for_empty_prompt": True})) == "encoded"


def test_an_sdxl_base_that_encodes_the_empty_prompt_trains_encoded(
    base_config, tiny_xl_models, monkeypatch, tmp_path
):
    """A base whose model_index.json sets force_zeros_for_empty_prompt false (its pipelines encode "")."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_xl_models["base"], base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    used, recorded = _recorded_run({**base_config, "pretrained_model_name_or_path": str(base)}, monkeypatch)
    assert used == ["encoded"] and recorded == "encoded"


def test_a_bad_value_is_one_line_before_anything_loads(capsys, tmp_path):
    flags = ["--pretrained_model_name_or_path", str(tmp_path / "nowhere"), "--train_shards", str(tmp_path)]
    assert parse_train_args([*flags, "--caption_dropout_embeds", "zeros"]).caption_dropout_embeds == "zeros"
    with pytest.raises(ConfigError) as error:
        parse_train_args([*flags, "--caption_dropout_embeds", "zero"])
    assert str(error.value) == (
        "argument --caption_dropout_embeds: invalid choice: 'zero' (choose from 'encoded', 'zeros')"
    )
    with pytest.raises(ConfigError, match="caption_dropout_embeds") as error:
        make_config(
            {"pretrained_model_name_or_path": "base", "train_shards": "s", "caption_dropout_embeds": "empty"}
        )
    assert "\n" not in str(error.value)
    # the command: exit status 2, one line, nothing read (the base does not exist, the output folder is not made)
    assert main([*flags, "--output_dir", str(tmp_path / "run"), "--caption_dropout_embeds", "zero"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: argument --caption_dropout_embeds: invalid choice: 'zero' (choose from 'encoded', 'zeros')"
    ]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="'encoded' or 'zeros'"):
        loop.brushnet_training_loss(
            None, None, {"caption": ["x"]}, torch.Generator(), caption_dropout_embeds="0"
        )


def test_a_resumed_run_keeps_what_its_dropped_captions_were(tmp_path):
    """Unset, a resume continues with what the interrupted run used: its record's value, or "encoded" for a run
    recorded before the option existed (an SDXL run begun then would otherwise switch to zeros mid-training)."""
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "train_config.yaml").write_text("seed: 1\ncaption_dropout_embeds: zeros\n")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "train_config.yaml").write_text("seed: 1\ncaption_dropout: 0.1\n")
    (tmp_path / "unrecorded").mkdir()
    assert loop.resumed_caption_dropout_embeds(tmp_path / "new") == "zeros"
    assert loop.resumed_caption_dropout_embeds(tmp_path / "old") == "encoded"
    assert loop.resumed_caption_dropout_embeds(tmp_path / "unrecorded") is None
    assert loop.resumed_caption_dropout_embeds(None) is None


def test_a_resumed_run_keeps_its_terms_unconditional_half(base_config, monkeypatch, tmp_path):
    """The guidance terms' unconditional half is recorded; a resume keeps it. A run recorded before
    ``unconditional_embeds`` existed trained the terms on the family's fixed half (SD1.5: the encoded ""), whatever
    its dropped captions were: it goes on with that, not with the recorded ``caption_dropout_embeds``."""
    import yaml

    from brushnet.training.family import SD15Family, SDXLFamily

    seen = []
    loss = loop.brushnet_training_loss

    def recording(*args, **kwargs):
        seen.append((kwargs["caption_dropout_embeds"], kwargs["unconditional_embeds"]))
        return loss(*args, **kwargs)

    monkeypatch.setattr(loop, "brushnet_training_loss", recording)
    values = {**base_config, "kept_invariance_weight": 1.0, "caption_dropout_embeds": "zeros"}
    loop.train(make_config({**values, "max_train_steps": 2}))
    out = Path(values["output_dir"])
    assert (
        load_config_file(out / "train_config.yaml")["unconditional_embeds"] == "zeros"
    )  # new: a dropped caption's
    assert set(seen) == {("zeros", "zeros")}
    record = out / "checkpoint-2" / "train_config.yaml"
    old = {k: v for k, v in yaml.safe_load(record.read_text()).items() if k != "unconditional_embeds"}
    record.write_text(yaml.safe_dump(old, sort_keys=False))  # as a run recorded before the setting existed
    seen.clear()
    resumed = {k: v for k, v in values.items() if k != "caption_dropout_embeds"}
    loop.train(make_config({**resumed, "max_train_steps": 3, "resume_from_checkpoint": "latest"}))
    assert set(seen) == {("zeros", "encoded")}
    assert load_config_file(out / "train_config.yaml")["unconditional_embeds"] == "encoded"

    for name, text in (
        ("new", "unconditional_embeds: zeros\n"),
        ("old", "caption_dropout_embeds: encoded\n"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_config.yaml").write_text(f"seed: 1\n{text}")
    assert loop.resumed_unconditional_embeds(tmp_path / "new", SD15Family) == "zeros"
    assert loop.resumed_unconditional_embeds(tmp_path / "old", SDXLFamily) == "zeros"  # SDXL's fixed half
    assert loop.resumed_unconditional_embeds(tmp_path / "old", SD15Family) == "encoded"
    assert loop.resumed_unconditional_embeds(None, SD15Family) is None

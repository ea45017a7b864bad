"""The Flamingo stage through `moegpt train`: a text model's export as the parent, frozen
(`train.freeze = ["lm.*"]`); the image encoder, resampler, cross-attention and <|image|>
embedding train on prepared image-text data, and the language model's weights stay exactly
the parent's. Checkpoints resume it like any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moegpt
from moegpt.config import load_config
from moegpt.data.prepare import prepare
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.train.trainer import Trainer

MODEL = (
    "[model]\nvocab_size = 400\nd_model = 32\nn_layers = 2\nn_heads = 4\nn_kv_heads = 1\n"
    "ffn_hidden = 64\nn_experts = 0\nmax_seq_len = 64\naux_loss_coef = 0.0\nz_loss_coef = 0.0\n"
)
VISION = (
    "[vision]\nenabled = true\nimage_size = 32\nchannels = 1\npatch_size = 8\nwidth = 32\n"
    "depth = 1\nheads = 2\nresampler_latents = 4\nxattn_every = 1\n"
)


def recipe(root: Path, *overrides: str, init_from: str = "", steps: int = 3):
    path = root / "vision.toml"
    path.write_text(
        MODEL + f'[data]\nseq_len = 64\ndata_dir = "{root / "data"}"\nworkers = 1\n'
        'packing = "documents"\ndocument_mask = true\n'
        '[[data.sources]]\nname = "rendered"\nkind = "image_text"\npath = "stdlib:rendered"\n'
        "items = 60\nepochs = 2\nval_fraction = 0.2\n"
        f"[train]\nsteps = {steps}\nglobal_batch_size = 4\nmicro_batch_size = 2\nlr = 1e-2\n"
        f'warmup_steps = 1\neval_every = 0\ninit_from = "{init_from}"\n'
        + ('freeze = ["lm.*"]\n' if init_from else "")
        + "[checkpoint]\nevery = 2\n"
        + VISION
    )
    return load_config(path, list(overrides))


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A text model of the recipe's [model] (random weights stand in for pretraining)."""
    root = tmp_path_factory.mktemp("parent")
    torch.manual_seed(3)
    config = recipe(root)
    return moegpt.save_model(Transformer(config.model), root / "export")


def test_the_flamingo_stage_trains_vision_and_leaves_the_language_model(tmp_path, parent):
    config = recipe(tmp_path, init_from=str(parent))
    prepare(config, log=lambda m: None)
    trainer = Trainer(config, tmp_path / "run", log=lambda m: None)
    trainer.run(progress=False)
    model = trainer.parts.models[0]
    before = moegpt.load(parent).state_dict()
    for name, tensor in model.lm.state_dict().items():
        assert torch.equal(tensor, before[name]), f"lm.{name} changed"
    gates = [float(b.attention_gate.detach()) for b in model.xattn.values()]
    assert all(g != 0 for g in gates), "the gates never opened"
    fresh = Trainer(recipe(tmp_path, init_from=str(parent)), tmp_path / "fresh", log=lambda m: None)
    fresh.prepare(resume=False)
    trained, initial = model.state_dict(), fresh.parts.models[0].state_dict()
    assert not torch.equal(trained["resampler.latents"], initial["resampler.latents"])


def test_the_image_marker_starts_from_the_parents_row(tmp_path, parent) -> None:
    config = recipe(tmp_path, init_from=str(parent))
    prepare(config, log=lambda m: None)
    trainer = Trainer(config, tmp_path / "run", log=lambda m: None)
    trainer.prepare(resume=False)
    row = moegpt.load(parent).tok_embeddings.weight[config.vision.image_token_id]
    assert torch.equal(trainer.parts.models[0].image_embedding.detach(), row.detach())


def test_a_vision_run_resumes_where_it_stopped(tmp_path, parent) -> None:
    """Three steps in one go equal two steps, a checkpoint, and one more."""
    config = recipe(tmp_path, init_from=str(parent), steps=3)
    prepare(config, log=lambda m: None)
    whole = Trainer(config, tmp_path / "whole", log=lambda m: None)
    whole.run(progress=False)
    first = Trainer(config, tmp_path / "split", log=lambda m: None)
    first.prepare()
    batches = iter(first.loader)
    for _ in range(2):
        first.train_step(batches)
    first.save()
    second = Trainer(config, tmp_path / "split", log=lambda m: None)
    second.run(progress=False)
    expected = whole.parts.models[0].state_dict()
    for name, tensor in second.parts.models[0].state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def test_a_vision_run_refuses_other_vision_parts_on_resume(tmp_path, parent) -> None:
    """Cross-attention every layer, then every other: half the trained blocks would be
    dropped. Refused before the run's recorded config is touched."""
    config = recipe(tmp_path, init_from=str(parent), steps=2)
    prepare(config, log=lambda m: None)
    Trainer(config, tmp_path / "run", log=lambda m: None).run(progress=False)
    recorded = (tmp_path / "run" / "config.toml").read_bytes()
    other = recipe(tmp_path, "--vision.xattn_every=2", init_from=str(parent), steps=2)
    with pytest.raises(UserError, match=r"holds a run with a different \[vision\] section"):
        Trainer(other, tmp_path / "run", log=lambda m: None).prepare()
    assert (tmp_path / "run" / "config.toml").read_bytes() == recorded


def test_the_image_token_must_be_the_tokenizers(tmp_path) -> None:
    config = recipe(tmp_path, "--vision.image_token_id", "5")
    prepare(config, log=lambda m: None)
    with pytest.raises(UserError, match="vision.image_token_id: 5, but .* has <\\|image\\|> at 4"):
        Trainer(config, tmp_path / "run", log=lambda m: None)


def test_a_vision_run_exports_and_starts_the_next_stage(tmp_path, parent, capsys) -> None:
    """`moegpt export` writes a vision run's every tensor and its [vision] section; the folder
    passes the header checks, starts a vision stage with exactly its weights and a text stage
    with its language model, and refuses (one line) a vision stage of other vision shapes and
    the text-only loaders."""
    from moegpt.cli import main
    from moegpt.train.export import load_run_model
    from moegpt.train.stage import load_parent, parent_state
    from moegpt.weights import check_folder

    config = recipe(tmp_path, init_from=str(parent), steps=2)
    prepare(config, log=lambda m: None)
    Trainer(config, tmp_path / "run", log=lambda m: None).run(progress=False)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    run_model, _ = load_run_model(tmp_path / "run")
    checked = check_folder(tmp_path / "out")
    assert checked.vision == config.vision and checked.config == config.model
    trained = run_model.state_dict()
    assert set(checked.header) == set(trained)

    child = Trainer(recipe(tmp_path, init_from=str(tmp_path / "out")), tmp_path / "child-run")
    child.log = lambda m: None
    child.prepare(resume=False)
    for name, tensor in child.parts.models[0].state_dict().items():
        assert torch.equal(tensor, trained[name]), name

    vision_parent = load_parent(tmp_path / "out")
    text_names = list(Transformer(config.model).state_dict())
    for name, tensor in parent_state(vision_parent, text_names).items():
        assert torch.equal(tensor, trained[f"lm.{name}"]), name  # a text stage's start

    args = ["eval", str(tmp_path / "out"), "--task", "transcribe", "--limit", "3", "--json"]
    capsys.readouterr()
    assert main([*args, "--config", str(tmp_path / "vision.toml")]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["transcribe"]["lines"] == 3 and 0 <= found["transcribe"]["exact_match"] <= 1
    assert len(found["gates"]) == config.model.n_layers  # a block before every layer
    assert main(args) == 2
    assert "--config: the transcribe task needs the vision recipe" in capsys.readouterr().err
    assert main([*args, "--lines", "words", "--config", str(tmp_path / "vision.toml")]) == 2
    error = capsys.readouterr().err  # --lines words reads the recipe's word lines
    assert "--config: the recipe has no image_text source 'stdlib:rendered-words'" in error
    assert main(["eval", str(parent), *args[2:], "--config", str(tmp_path / "vision.toml")]) == 2
    assert "a language model; this needs a vision model's folder" in capsys.readouterr().err

    other = recipe(tmp_path, "--vision.width", "16", init_from=str(tmp_path / "out"))
    with pytest.raises(UserError, match="vision.width: 16 differs from 32 in train.init_from"):
        Trainer(other, tmp_path / "other-run", log=lambda m: None).prepare(resume=False)
    with pytest.raises(UserError, match="a vision model, which moegpt.load does not take"):
        moegpt.load(tmp_path / "out")


def test_a_vision_folder_whose_tensors_do_not_match_its_config_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from moegpt.model.vision import model_for
    from moegpt.weights import WEIGHTS_FILE, check_folder

    config = recipe(tmp_path)
    folder = moegpt.save_model(model_for(config.model, config.vision), tmp_path / "folder")
    state = load_file(folder / WEIGHTS_FILE)
    state.pop("xattn.1.attention_gate")
    save_file(state, folder / WEIGHTS_FILE)
    with pytest.raises(UserError, match=r"missing \['xattn.1.attention_gate'\]"):
        check_folder(folder)


def test_layouts_the_trainer_cannot_run_with_vision_are_refused(tmp_path, parent) -> None:
    config = recipe(tmp_path, "--parallel.pp", "2", "--parallel.pp_microbatches", "2")
    prepare(config, log=lambda m: None)
    with pytest.raises(UserError, match="parallel.pp: the trainer does not run vision models"):
        Trainer(config, tmp_path / "run", log=lambda m: None)


def test_images_prepared_at_another_size_are_refused(tmp_path) -> None:
    prepare(recipe(tmp_path), log=lambda m: None)
    config = recipe(tmp_path, "--vision.image_size", "16")
    with pytest.raises(UserError, match="vision.image_size: 16, but .* images are 32 pixels"):
        Trainer(config, tmp_path / "run", log=lambda m: None)


def test_vision_folders_with_bad_sections_or_in_other_formats_are_one_line(
    tmp_path, capsys
) -> None:
    from moegpt.cli import main
    from moegpt.model.vision import model_for
    from moegpt.weights import CONFIG_FILE, check_folder

    config = recipe(tmp_path)
    folder = moegpt.save_model(model_for(config.model, config.vision), tmp_path / "folder")
    assert main(["convert", str(folder), str(tmp_path / "hf")]) == 2
    assert "a vision model; other formats have no place" in capsys.readouterr().err
    meta = json.loads((folder / CONFIG_FILE).read_text())
    for section, message in (
        ({**meta["vision"], "image_token_id": 999}, "vision.image_token_id 999 is outside"),
        ([1], "vision: expected an object"),
    ):
        (folder / CONFIG_FILE).write_text(json.dumps({**meta, "vision": section}))
        with pytest.raises(UserError, match=message):
            check_folder(folder)


def test_the_clip_stage_trains_the_encoder_and_hands_it_to_the_flamingo_stage(
    tmp_path, parent, capsys
) -> None:
    """Stage (a) through `moegpt train` (`vision.objective = "clip"`): only the image encoder
    and the contrastive heads change, the loss is a mean over captioned images (no
    perplexity), and its export starts stage (b) with that encoder; the export is refused
    where a model that reads images into text is needed."""
    from moegpt.cli import main

    clip = ("--vision.objective", "clip", "--train.eval_every", "2")
    config = recipe(tmp_path, *clip, init_from=str(parent), steps=2)
    prepare(config, log=lambda m: None)
    lines: list[str] = []
    trainer = Trainer(config, tmp_path / "clip", log=lines.append)
    trainer.run(progress=False)
    assert any("frozen:" in line and "resampler.*" in line for line in lines)
    evaluated = trainer.evaluate()
    assert "rendered/loss" in evaluated and "rendered/ppl" not in evaluated
    # chance: the loss of a uniform guess. Zeroed image features score every caption 0, which
    # is that guess, so the loss must then equal it (ln of each micro-batch's images).
    with torch.no_grad():
        model = trainer.parts.models[0]
        saved = model.clip.image_projection.weight.clone()
        model.clip.image_projection.weight.zero_()
        uniform = trainer.evaluate()
        model.clip.image_projection.weight.copy_(saved)
    for source in {k.split("/")[0] for k in evaluated}:
        assert evaluated[f"{source}/chance"] == pytest.approx(uniform[f"{source}/loss"], rel=1e-5)
        assert evaluated[f"{source}/chance"] > 1.0  # several images a micro-batch
    fresh = Trainer(recipe(tmp_path, *clip, init_from=str(parent)), tmp_path / "fresh")
    fresh.log = lambda m: None
    fresh.prepare(resume=False)
    trained = trainer.parts.models[0].state_dict()
    initial = fresh.parts.models[0].state_dict()
    changed = {n for n in trained if not torch.equal(trained[n], initial[n])}
    assert "encoder.patch_embedding.weight" in changed and "clip.logit_scale" in changed
    assert all(n.startswith(("encoder.", "clip.")) for n in changed), changed

    assert main(["export", str(tmp_path / "clip"), str(tmp_path / "clip-out")]) == 0
    stage_b = Trainer(recipe(tmp_path, init_from=str(tmp_path / "clip-out")), tmp_path / "b")
    stage_b.log = lambda m: None
    stage_b.prepare(resume=False)
    started = stage_b.parts.models[0].state_dict()
    assert not any(n.startswith("clip.") for n in started)
    for name, tensor in started.items():
        if name.startswith(("encoder.", "lm.")):
            assert torch.equal(tensor, trained[name]), name

    args = ["eval", str(tmp_path / "clip-out"), "--task", "transcribe", "--limit", "3"]
    capsys.readouterr()
    assert main([*args, "--config", str(tmp_path / "vision.toml")]) == 2
    assert "a CLIP-stage model" in capsys.readouterr().err


def test_a_clip_stage_after_a_clip_stage_keeps_its_heads_width(tmp_path, parent) -> None:
    from moegpt.config import ConfigError

    clip = ("--vision.objective", "clip")
    config = recipe(tmp_path, *clip, init_from=str(parent), steps=1)
    prepare(config, log=lambda m: None)
    Trainer(config, tmp_path / "clip", log=lambda m: None).run(progress=False)
    wider = recipe(tmp_path, *clip, "--vision.clip_dim", "64", init_from=str(tmp_path / "clip"))
    with pytest.raises(UserError, match="vision.clip_dim: 64 differs from 128 in train.init"):
        Trainer(wider, tmp_path / "wider", log=lambda m: None).prepare(resume=False)
    with pytest.raises(ConfigError, match="vision.objective: the clip stage learns from"):
        recipe(tmp_path, *clip, "--data.sources.0.kind=text", "--data.sources.0.path=stdlib:code")


def test_the_clip_stage_refuses_tensor_parallelism(tmp_path, parent) -> None:
    config = recipe(tmp_path, "--vision.objective", "clip", "--parallel.tp", "2")
    prepare(config, log=lambda m: None)
    with pytest.raises(UserError, match="parallel.tp: the CLIP stage trains only the image"):
        Trainer(config, tmp_path / "run", log=lambda m: None)

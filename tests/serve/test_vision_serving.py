"""Images in serving: a vision model's folder, served with images, gives the greedy tokens of
the no-cache vision forward (the per-sequence mode, a batch of requests with two, one and no
images), each request seeing only its own images; chat ``image_url`` parts become
``<|image|>`` tokens; a bad image gets a 400 naming its field and the server goes on serving."""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moegpt.chat import chatml_tokenizer_config
from moegpt.config import ServeConfig
from moegpt.data.tokenizer import IMAGE, train_tokenizer
from moegpt.errors import UserError
from moegpt.model import Transformer
from moegpt.model.vision import VisionLanguageModel
from moegpt.serve import media
from moegpt.serve.engine import Engine
from moegpt.serve.media import VisualCache, decode_image, image_bytes
from moegpt.serve.sequence import SamplingParams
from moegpt.weights import load_vision, save_model
from tests.conftest import small_config, small_vision_config
from tests.serve.test_server_hardening import MODEL, assert_openai_error, serving

SIZE = small_vision_config().image_size
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vision-model")
    source = Path(torch.__file__).with_name("functional.py").read_text()
    tokenizer = train_tokenizer([source], vocab_size=384)
    tokenizer.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(chatml_tokenizer_config())
    torch.manual_seed(0)
    lm = Transformer(small_config(vocab_size=tokenizer.get_vocab_size(), n_layers=3))
    model = VisionLanguageModel(lm, small_vision_config(), tokenizer.token_to_id(IMAGE))
    with torch.no_grad():  # open the gates: the images change the text
        for name, param in model.named_parameters():
            if name.endswith("_gate"):
                param.fill_(1.0)
    files = {name: root / name for name in ("tokenizer.json", "tokenizer_config.json")}
    return save_model(model, root / "model", extra_files=files)


def image(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (SIZE, SIZE), dtype=torch.uint8, generator=generator)


@torch.inference_mode()
def reference(
    model: VisionLanguageModel, ids: list[int], images: list[torch.Tensor], n: int
) -> list[tuple[int, float]]:
    """Greedy tokens and their log-probabilities from the whole forward, recomputed from
    scratch at every token; an ``<|image|>`` ends it, as the engine stops there."""
    tokens, out = list(ids), []
    pixels = torch.stack(images)[None] if images else None
    for _ in range(n):
        logprobs = model(torch.tensor([tokens]), pixels).logits[0, -1].log_softmax(-1)
        token = int(logprobs.argmax())
        if token == model.image_token_id:
            break
        out.append((token, float(logprobs[token])))
        tokens.append(token)
    return out


def run(
    engine: Engine, requests: list[tuple[list[int], list[torch.Tensor]]], n: int
) -> list[list[tuple[int, float]]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params, images=imgs) for p, imgs in requests]
    got: dict[str, list[tuple[int, float]]] = {i: [] for i in ids}
    while engine.has_work():
        for out in engine.step():
            got[out.request_id] += [(e["token"], e["logprob"]) for e in out.logprobs]
    return [got[i] for i in ids]


@pytest.mark.parametrize("mask_entries", [media.MASK_ENTRIES, 1])
def test_served_tokens_equal_the_no_cache_forward(
    vision_model: Path, mask_entries: int, monkeypatch
) -> None:
    """All sequences with images cross-attend together, or (``mask_entries`` 1) each alone."""
    monkeypatch.setattr(media, "MASK_ENTRIES", mask_entries)
    engine = Engine.from_folder(vision_model, ServeConfig(calibrate=False), device="cpu")
    model = load_vision(vision_model)
    marker = model.image_token_id
    text = lambda s: engine.tokenizer.encode(s).ids  # noqa: E731
    requests = [
        ([marker, *text("def f(x):")], [image(1)]),
        ([*text("import os\n"), marker, *text("x = "), marker], [image(2), image(3)]),
        (text("class A:"), []),
        ([marker, *text("def f(x):")], [image(4)]),  # request 0 with another image
    ]
    want = [reference(model, ids, images, 12) for ids, images in requests]
    # Each request's images move its log-probabilities: the comparison below can tell.
    assert abs(want[0][0][1] - want[3][0][1]) > 1e-2
    got = run(engine, requests, 12)
    for have, expected in zip(got, want, strict=True):
        assert [t for t, _ in have] == [t for t, _ in expected]
        assert np.allclose([lp for _, lp in have], [lp for _, lp in expected], atol=1e-4)
    assert engine.allocator.used == 0


def test_the_samples_of_one_request_share_its_encoded_images(
    vision_model: Path, monkeypatch
) -> None:
    engine = Engine.from_folder(vision_model, ServeConfig(calibrate=False), device="cpu")
    encodings = []
    real = VisualCache.encode.__func__
    monkeypatch.setattr(
        VisualCache, "encode", classmethod(lambda cls, *a: encodings.append(1) or real(cls, *a))
    )
    marker = engine.vision.image_token_id
    params = SamplingParams(max_tokens=4, temperature=1.0, n=3, seed=1)
    engine.add_request([marker, 10, 11], params, images=[image(1)])
    while engine.has_work():
        engine.step()
    assert len(encodings) == 1


def test_images_that_do_not_fit_the_request_are_refused(
    vision_model: Path, text_model: Path
) -> None:
    engine = Engine.from_folder(
        vision_model, ServeConfig(calibrate=False, max_images=1), device="cpu"
    )
    marker = engine.vision.image_token_id
    with pytest.raises(
        UserError, match=r"^images: the prompt marks 1 image\(s\) with <\|image\|> but 0"
    ):
        engine.add_request([marker, 10, 11])
    with pytest.raises(UserError, match=r"^images: 2 images, more than the 1"):
        engine.add_request([marker, marker], images=[image(1), image(2)])
    with pytest.raises(UserError, match=r"^images\[0\]: expected a 8x8 grey uint8 image"):
        engine.add_request([marker, 10], images=[torch.zeros(4, 4, dtype=torch.uint8)])
    text = Engine.from_folder(text_model, ServeConfig(calibrate=False), device="cpu")
    with pytest.raises(UserError, match="^images: this model has no vision encoder"):
        text.add_request([10, 11], images=[image(1)])


def data_url(pixels: np.ndarray, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=kind)
    mime = "png" if kind == "PNG" else "jpeg"
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def chat(*parts: dict) -> dict:
    content = [{"type": "text", "text": "What is this?"}, *parts]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def broken_png() -> bytes:
    """A PNG whose image-data chunk claims 16 bytes fewer than it holds: Pillow raises
    SyntaxError on it, not OSError."""
    data = bytearray(
        encoded(Image.fromarray(np.arange(4096, dtype=np.uint8).reshape(64, 64)), "PNG")
    )
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[at : at + 4])
    data[at : at + 4] = struct.pack(">I", length - 16)
    return bytes(data)


def test_images_decode_as_a_viewer_shows_them() -> None:
    """Transparency lies over white (the training images' background), EXIF orientation is
    applied, a JPEG with extra pictures (MPO) reads as its first, and a broken PNG is one
    line."""
    glyph = np.zeros((16, 16), dtype=np.uint8)
    alpha = np.zeros((16, 16), dtype=np.uint8)
    alpha[4:12, 4:12] = 255  # black ink on a transparent page
    page = Image.fromarray(np.stack([glyph, alpha], axis=-1), "LA")
    grey = decode_image(encoded(page, "PNG"), 16, "image")
    assert int(grey[0, 0]) == 255 and int(grey[8, 8]) == 0
    top_dark = np.full((16, 16), 255, dtype=np.uint8)
    top_dark[:8] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the dark half on the right
    turned = decode_image(encoded(Image.fromarray(top_dark), "JPEG", exif=exif), 16, "image")
    assert turned[:, 10:].float().mean() < 40 and turned[:, :6].float().mean() > 215
    first, second = Image.fromarray(top_dark), Image.fromarray(255 - top_dark)
    mpo = encoded(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    assert torch.equal(
        decode_image(mpo, 16, "image"), decode_image(encoded(first, "JPEG"), 16, "x")
    )
    with pytest.raises(SyntaxError):
        Image.open(io.BytesIO(broken_png())).load()
    with pytest.raises(UserError, match=r"^image: not an image that decodes \(SyntaxError\)$"):
        decode_image(broken_png(), 16, "image")


def test_data_urls_may_wrap_their_base64_and_capitalise_their_type() -> None:
    png = encoded(Image.new("L", (4, 4)), "PNG")
    wrapped = base64.encodebytes(png * 20).decode()  # 76-column lines
    assert "\n" in wrapped
    assert image_bytes("data:image/PNG;base64," + wrapped, "image") == png * 20
    assert image_bytes("DATA:image/Jpeg;base64," + base64.b64encode(png).decode(), "x") == png


def test_chat_image_parts_are_served_and_bad_ones_get_a_400(vision_model: Path) -> None:
    engine = Engine.from_folder(
        vision_model, ServeConfig(calibrate=False, max_images=2), device="cpu"
    )
    grey = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE) * 3
    good = chat(image_part(data_url(grey)))
    with serving(engine) as live:
        r = live.post("/v1/chat/completions", good)
        assert r.status_code == 200, r.text
        # The template's tokens, plus the one <|image|> the part became.
        turns = [{"role": "user", "content": "What is this?"}]
        text_only = len(engine.chat_template.encode(turns, True))
        assert r.json()["usage"]["prompt_tokens"] == text_only + 1
        rgb = np.stack([grey, grey, grey], axis=-1)
        assert (
            live.post("/v1/chat/completions", chat(image_part(data_url(rgb, "JPEG")))).status_code
            == 200
        )
        field = "messages[0].content[1].image_url"
        bad = [
            (
                "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
                "not an image that decodes",
            ),
            ("data:image/png;base64,%%%", "base64 is malformed"),
            (
                "data:image/png;base64," + base64.b64encode(broken_png()).decode(),
                "not an image that decodes (SyntaxError)",
            ),
            ("https://example.com/cat.png", "remote image URLs are not fetched"),
            ("data:text/plain;base64,aGk=", "expected a data:image/png;base64"),
        ]
        for url, reason in bad:
            error = assert_openai_error(
                live.post("/v1/chat/completions", chat(image_part(url))), 400, field
            )
            assert reason in error["message"]
        # A PNG that claims 20000 x 10000 pixels in a few KB: refused before decoding.
        buffer = io.BytesIO()
        Image.new("L", (20000, 10000)).save(buffer, format="PNG")
        bomb = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        error = assert_openai_error(
            live.post("/v1/chat/completions", chat(image_part(bomb))), 400, field
        )
        assert "pixels" in error["message"]
        # Text cannot smuggle in an image's place.
        forged = {"role": "user", "content": "look: \x00moegpt-image\x00"}
        r = live.post("/v1/chat/completions", {**good, "messages": [forged]})
        assert "reserved marker" in assert_openai_error(r, 400, "messages")["message"]
        three = chat(*[image_part(data_url(grey))] * 3)
        error = assert_openai_error(
            live.post("/v1/chat/completions", three), 400, "messages[0].content[3].image_url"
        )
        assert "more than the 2 images" in error["message"]
        assert live.post("/v1/chat/completions", good).status_code == 200  # still serving
        # The official client sends the same parts.
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=good["messages"], max_tokens=4)
        assert reply.usage.prompt_tokens == text_only + 1
        with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched"):
            client.chat.completions.create(
                model=MODEL, messages=chat(image_part("http://x/y.png"))["messages"], max_tokens=4
            )
        assert engine.allocator.used == 0


def test_image_caches_are_kept_out_of_the_kv_cache_budget(vision_model: Path, monkeypatch) -> None:
    from moegpt.serve import engine as engine_module
    from moegpt.serve.media import visual_bytes_per_image

    model = load_vision(vision_model)
    per_image = visual_bytes_per_image(model)
    config = ServeConfig(calibrate=False, max_batch_size=2, max_images=3, num_kv_blocks=10)
    block = engine_module.bytes_per_token(model.lm.config, torch.float32) * config.block_size
    # A budget of exactly 10 blocks and the images' room: it fits; one byte less, it does not.
    room = 2 * 3 * per_image
    monkeypatch.setattr(engine_module, "kv_budget_bytes", lambda d: (10 * block + room, "test"))
    assert engine_module.kv_cache_blocks(model.lm, config, reserved_bytes=room)[0] == 10
    monkeypatch.setattr(engine_module, "kv_budget_bytes", lambda d: (10 * block + room - 1, "t"))
    with pytest.raises(UserError, match="serve.num_kv_blocks: 10 blocks"):
        Engine.from_folder(vision_model, config, device="cpu")
    # A cached image holds exactly what was reserved for it.
    cache = VisualCache.encode(model, image(1)[None], [0])
    assert cache.nbytes == per_image
    # Overlapped, finished requests' images outlive the step that ends them while their
    # successors encode theirs: room for twice the batch's.
    roomy = dataclasses.replace(config, num_kv_blocks=0)
    plain = Engine.from_folder(vision_model, dataclasses.replace(roomy, overlap="off"), "cpu")
    overlapped = Engine.from_folder(vision_model, dataclasses.replace(roomy, overlap="on"), "cpu")
    assert plain.image_cache_bytes == room and overlapped.image_cache_bytes == 2 * room


def test_generate_takes_images_from_files(vision_model: Path, tmp_path: Path, capsys) -> None:
    from moegpt.cli import main

    picture = tmp_path / "picture.png"
    Image.fromarray(image(5).numpy()).save(picture)
    base = ["generate", str(vision_model), "--temperature", "0", "--max-tokens", "6"]
    assert main([*base, "--prompt", "def f(x):", "--image", str(picture)]) == 0
    printed = capsys.readouterr().out
    engine = Engine.from_folder(vision_model, ServeConfig(calibrate=False), device="cpu")
    marker = engine.vision.image_token_id
    ids = [marker, *engine.tokenizer.encode("def f(x):").ids]
    want = [t for t, _ in reference(load_vision(vision_model), ids, [image(5)], 6)]
    assert printed == "def f(x):" + engine.tokenizer.decode(want) + "\n"
    assert main([*base, "--prompt", "x", "--image", str(tmp_path / "missing.png")]) == 2
    assert "--image: " in capsys.readouterr().err


def test_a_vision_model_serves_in_bfloat16(vision_model: Path) -> None:
    """``serve.dtype = "bfloat16"`` (auto's choice on a GPU) casts the encoder, resampler and
    cross-attention with the language model, and images travel in that dtype: the first
    token's log-probabilities follow the bfloat16 model's own forward."""
    config = ServeConfig(calibrate=False, dtype="bfloat16")
    engine = Engine.from_folder(vision_model, config, device="cpu")
    assert {p.dtype for p in engine.vision.parameters()} == {torch.bfloat16}
    model = load_vision(vision_model, dtype=torch.bfloat16)
    prompt = [model.image_token_id, *engine.tokenizer.encode("def f(x):").ids]
    [got] = run(engine, [(prompt, [image(5)])], 1)
    with torch.inference_mode():
        logprobs = model(torch.tensor([prompt]), image(5)[None, None]).logits[0, -1].float()
    logprobs = logprobs.log_softmax(-1)
    token = int(logprobs.argmax())
    assert got[0][0] == token and abs(got[0][1] - float(logprobs[token])) < 0.05

"""Diffusion LoRA on tiny random diffusers pipelines (built here: no diffusion weights ship offline): adapters
round-trip through diffusers' own loaders with equal outputs, Kohya files import with a full report, the
noise-prediction objective matches diffusers' math and learns, bad data names file:line: field."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import perturb_adapters

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one thread; on a busy shared CPU, several threads are ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny StableDiffusionPipeline folder (VAE, CLIP text encoder + tokenizer, UNet, DDPM scheduler)."""
    from tunesmith.diffusion.tiny import build_tiny_pipeline
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe", words=("zero", "one"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 small images with captions in the imagefolder convention (metadata.jsonl beside them)."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        x = np.zeros((20, 24, 3), np.uint8)
        x[:, :, i % 3] = 200 if i % 2 else 40  # two captions, two looks: a signal to learn
        x += (rng.random(x.shape) * 30).astype(np.uint8)
        Image.fromarray(x).save(folder / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png", "text": "one" if i % 2 else "zero"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def lora_model(sd, targets=ATTENTION, **options):
    from tunesmith.adapters import LoraConfig, add_adapter
    from tunesmith.diffusion.pipeline import load_diffusion_model
    model = load_diffusion_model(sd).eval()
    add_adapter(model, LoraConfig(targets=targets, **{"r": 4, "alpha": 8.0, **options}))
    perturb_adapters(model, std=0.3)
    return model


def unet_inputs(unet, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    return (torch.randn(batch, c, s, s, generator=g), torch.tensor([10, 700])[:batch],
            torch.randn(batch, 16, unet.config.cross_attention_dim, generator=g))


def unet_out(unet, inputs):
    with torch.no_grad():
        return unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample


def test_round_trip_through_unet_load_lora_adapter(sd, tmp_path):
    """Attention and conv LoRA with alpha != r and a per-module rank: diffusers' UNet loader gives the same
    outputs from both files (the UNet file without a prefix, the pipeline file with prefix='unet')."""
    from diffusers import UNet2DConditionModel
    from tunesmith.diffusion.lora_files import PIPELINE_FILE, UNET_FILE
    model = lora_model(sd, targets=[*ATTENTION, "conv1"], rank_pattern={"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 2})
    model.write_adapter_files(tmp_path)
    inputs = unet_inputs(model.unet)
    want = unet_out(model.unet, inputs)
    for weight_name, prefix in ((UNET_FILE, None), (PIPELINE_FILE, "unet")):
        unet = UNet2DConditionModel.from_pretrained(sd / "unet").eval()
        base = unet_out(unet, inputs)
        unet.load_lora_adapter(tmp_path, prefix=prefix, weight_name=weight_name, use_safetensors=True)
        got = unet_out(unet, inputs)
        assert (got - base).abs().max() > 1e-3  # the adapter was loaded and changes the output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_round_trip_through_pipeline_load_lora_weights_with_text_encoder(sd, tmp_path):
    """UNet and text-encoder LoRA in one pytorch_lora_weights.safetensors: pipe.load_lora_weights(folder)."""
    from diffusers import StableDiffusionPipeline
    model = lora_model(sd, targets=[*ATTENTION, "q_proj", "v_proj"], alpha=4.0)
    model.write_adapter_files(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.load_lora_weights(tmp_path)
    inputs = unet_inputs(model.unet)
    torch.testing.assert_close(unet_out(pipe.unet.eval(), inputs), unet_out(model.unet, inputs), rtol=1e-5, atol=1e-5)
    ids = pipe.tokenizer(["one", "zero"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder.eval()(ids)[0], model.text_encoder(ids)[0], rtol=1e-5, atol=1e-5)


def test_sdxl_conditioning_and_pipeline_round_trip(tmp_path):
    """SDXL layout: two text encoders, pooled embeddings and time ids; StableDiffusionXLPipeline loads the LoRA."""
    from diffusers import StableDiffusionXLPipeline
    from tunesmith.diffusion.pipeline import load_tokenizers
    from tunesmith.diffusion.tiny import build_tiny_pipeline
    from tunesmith.diffusion.data import tokenize
    xl = build_tiny_pipeline(tmp_path / "xl", sdxl=True)
    model = lora_model(xl, targets=[*ATTENTION, "q_proj"])
    assert model.sdxl
    model.write_adapter_files(tmp_path / "lora")
    ids, _ = tokenize(load_tokenizers(xl), ["one", ""])
    with torch.no_grad():
        hidden, pooled = model.encode_text(ids)
    assert hidden.shape == (2, 16, 64) and pooled.shape == (2, 32)
    pipe = StableDiffusionXLPipeline.from_pretrained(xl)
    pipe.load_lora_weights(tmp_path / "lora")
    x, t, _ = unet_inputs(model.unet)
    time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * 2, dtype=torch.float32)
    with torch.no_grad():
        want = model.predict(x, t, hidden, pooled, time_ids)
        got = pipe.unet.eval()(x, t, encoder_hidden_states=hidden,
                               added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pipe.text_encoder_2.eval()(ids[1])[0], model.text_encoder_2(ids[1])[0])


def test_merged_equals_unmerged(sd):
    """Folding the LoRA (attention, conv, text encoder) into the weights changes no output (float32 rounding)."""
    from tunesmith.adapters import merge_adapters, unmerge_adapters
    model = lora_model(sd, targets=[*ATTENTION, "conv1", "q_proj"])
    inputs = unet_inputs(model.unet)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want, want_text = unet_out(model.unet, inputs), model.text_encoder(ids)[0]
        merge_adapters(model)
        torch.testing.assert_close(unet_out(model.unet, inputs), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.text_encoder(ids)[0], want_text, rtol=1e-4, atol=1e-4)
        unmerge_adapters(model)
        torch.testing.assert_close(unet_out(model.unet, inputs), want, rtol=1e-4, atol=1e-4)


# -- the objective -------------------------------------------------------------------------------------------
def test_objective_targets_and_min_snr_match_diffusers():
    """x_t, the v target and the min-SNR weights are what diffusers' scheduler and training utils compute."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    from tunesmith.objectives.diffusion import Diffusion, min_snr_weights, snr
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    obj = Diffusion(prediction_type="v_prediction", snr_gamma=5.0)
    batch = {"latents": x0, "noise": noise, "timesteps": t}
    torch.testing.assert_close(obj.target(batch), ref.get_velocity(x0, noise, t))
    torch.testing.assert_close(snr(obj.scheduler.alphas_cumprod, t), compute_snr(ref, t))
    s = compute_snr(ref, t)
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), torch.minimum(s, torch.full_like(s, 5.0)) / (s + 1))
    out = torch.zeros_like(x0)
    loss, n = obj.loss(out, batch)
    per_image = ((ref.get_velocity(x0, noise, t)) ** 2).flatten(1).mean(1) * min_snr_weights(s, 5.0, "v_prediction")
    assert n == 3 and float(loss) == pytest.approx(float(per_image.sum()), rel=1e-6)
    assert Diffusion(prediction_type="epsilon").target(batch) is noise
    with pytest.raises(Exception, match="prediction_type"):
        Diffusion(prediction_type="sample")


def run_config(sd, images, out, **sections):
    from tunesmith.config import config_from_dict
    base = {"model": {"name": str(sd)},
            "adapter": {"kind": "lora", "r": 8, "alpha": 8, "targets": [*ATTENTION, "conv1", "conv2"]},
            "data": {"train": str(images), "eval": str(images / "metadata.jsonl"), "image_size": 16},
            "training": {"max_steps": 12, "batch_size": 6, "lr": 5e-3, "log_every": 1, "eval_every": 12,
                         "eval_at_start": True, "save_every": 0, "bf16": False},
            "output": {"dir": str(out), "progress": False}}
    for key, value in sections.items():  # merged into the section (an adapter of another kind replaces it)
        base[key] = value if key == "adapter" and "kind" in value else {**base.get(key, {}), **value}
    return config_from_dict(base)


def test_training_lowers_the_loss_and_diffusers_loads_the_run(sd, images, tmp_path):
    """A real run (v-prediction, min-SNR, caption dropout): the fixed-noise eval loss falls; evaluating the
    finished run again gives the same loss; the run's adapter folder loads with pipe.load_lora_weights and gives
    the UNet tunesmith's load_run gives."""
    from diffusers import StableDiffusionPipeline
    from tunesmith.train import encode_eval_set, evaluate, train
    from tunesmith.train.artifacts import load_run
    cfg = run_config(sd, images, tmp_path / "run", objective={"prediction_type": "v_prediction", "snr_gamma": 5.0},
                     data={"caption_dropout": 0.2})
    result = train(cfg, log=lambda *a: None)
    assert result["eval_loss"] < 0.95 * result["before"]["eval_loss"], result
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["task"], info["objective"], info["format"]) == ("diffusion", "diffusion", "image_caption")
    assert info["objective_params"]["prediction_type"] == "v_prediction"
    run = load_run(tmp_path / "run")
    again = evaluate(run.model, encode_eval_set(str(images / "metadata.jsonl"), run), run.objective, run.pad_id)
    assert again["eval_loss"] == pytest.approx(result["eval_loss"], rel=1e-5)  # `tunesmith eval`: same noise, same loss
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.load_lora_weights(tmp_path / "run" / "adapter")
    inputs = unet_inputs(run.model.unet)
    torch.testing.assert_close(unet_out(pipe.unet.eval(), inputs), unet_out(run.model.unet, inputs), rtol=1e-5, atol=1e-5)


def test_text_encoder_lora_trains_from_token_ids(sd, images, tmp_path):
    """With a text-encoder target, captions stay token ids and the encoder's LoRA gets gradients."""
    from tunesmith.train.run import setup
    from tunesmith.train.loop import train_step
    cfg = run_config(sd, images, tmp_path / "run", adapter={"targets": ["to_k", "to_v", "q_proj", "v_proj"]},
                     training={"max_steps": 1, "eval_at_start": False})
    run = setup(cfg, log=lambda *a: None)
    assert "input_ids" in run.data.train[0] and "encoder_hidden_states" not in run.data.train[0]
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad and "text_encoder" in n}
    train_step(run)
    moved = [n for n, p in run.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved)


def test_generate_grid_and_merge_into_a_pipeline_folder(sd, images, tmp_path):
    """`tunesmith generate` on a diffusion run writes the base | adapter grid; `tunesmith merge` writes a
    pipeline folder diffusers loads whole, whose UNet gives the adapter's outputs."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from tunesmith.cli import main
    from tunesmith.train import train
    from tunesmith.train.artifacts import load_run
    train(run_config(sd, images, tmp_path / "run", training={"max_steps": 2, "eval_at_start": False}), log=lambda *a: None)
    out = tmp_path / "grid.png"
    assert main(["generate", str(tmp_path / "run"), "--prompt", "zero", "--prompt", "one", "--out", str(out),
                 "--steps", "3", "--num-images", "2", "--pixel-scale", "2"]) == 0
    with Image.open(out) as im:
        assert im.height == 16 + 2 * 32 and im.width > 2 * 2 * 32  # a row per prompt, two panels of 2 images
    assert main(["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    merged = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    inputs = unet_inputs(merged.unet)
    torch.testing.assert_close(unet_out(merged.unet.eval(), inputs), unet_out(load_run(tmp_path / "run").model.unet, inputs),
                               rtol=1e-4, atol=1e-4)


# -- data ----------------------------------------------------------------------------------------------------
def test_bad_rows_are_reported_as_file_line_field(sd, images, tmp_path):
    from tunesmith.data.formats import DataError
    from tunesmith.diffusion.data import read_pairs
    file = tmp_path / "metadata.jsonl"
    file.write_text(json.dumps({"file_name": str(images / "00.png"), "text": "zero"}) + "\n"
                    + json.dumps({"file_name": "missing.png", "text": "one"}) + "\n"
                    + json.dumps({"text": "no image named"}) + "\n"
                    + json.dumps({"file_name": str(images / "01.png")}) + "\n")
    with pytest.raises(DataError) as e:
        read_pairs(str(file))
    msg = str(e.value)
    assert f"{file}:2: file_name: image {tmp_path / 'missing.png'} not found" in msg
    assert f"{file}:3: file_name: missing" in msg
    assert f"{file}:4: text: missing" in msg
    assert ":1:" not in msg and len(e.value.problems) == 3


def test_16_bit_greyscale_images_keep_their_grey(tmp_path):
    """Pillow's convert("RGB") clips 16-bit values at 255: mid grey (32768 of 65535) would train as white."""
    from PIL import Image
    from tunesmith.diffusion.data import Pair, load_image
    Image.fromarray(np.full((20, 24), 32768, np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(np.full((20, 24), 0.25, np.float32)).save(tmp_path / "f.tiff")  # float mode F, in [0, 1]
    for name, grey in (("g16.png", 0.0), ("f.tiff", -0.5)):
        for channels in (3, 1):
            x, _ = load_image(Pair("m.jsonl", 1, tmp_path / name, ""), 16, channels)
            assert x.shape == (channels, 16, 16)
            torch.testing.assert_close(x, torch.full_like(x, grey), atol=1 / 127.5, rtol=0)


def test_exif_orientation_is_applied_before_resizing_and_size_conditioning(tmp_path):
    """A phone photo stores its pixels sideways plus EXIF Orientation; it trains as displayed (diffusers'
    DreamBooth scripts apply exif_transpose too), and SDXL's original size is the displayed height, width."""
    from PIL import Image
    from tunesmith.diffusion.data import Pair, load_image
    x = np.zeros((16, 32, 3), np.uint8)  # stored 32 wide, 16 high: left half red, right half blue
    x[:, :16, 0] = 255
    x[:, 16:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display -> 16 wide, 32 high, red on top
    Image.fromarray(x).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    img, cond = load_image(Pair("m.jsonl", 1, tmp_path / "phone.jpg", ""), 16, 3)
    assert cond == [32, 16, 8, 0, 16, 16]  # original (h, w) as displayed; the crop is vertical
    red, blue = img[0], img[2]  # (S, S) after the centre crop: the top half red, the bottom half blue
    assert red[:6].mean() > 0.8 and blue[:6].mean() < -0.8 and red[-6:].mean() < -0.8 and blue[-6:].mean() > 0.8


def test_diffusion_config_errors_are_clear(sd, images, tmp_path):
    from tunesmith.errors import ConfigError
    from tunesmith.train.run import setup
    with pytest.raises(ConfigError, match="adapter.kind=lora"):
        setup(run_config(sd, images, tmp_path / "a", adapter={"kind": "ia3", "targets": ATTENTION}), log=lambda *a: None)
    with pytest.raises(ConfigError, match="augment"):
        setup(run_config(sd, images, tmp_path / "b", data={"augment": "flip"}), log=lambda *a: None)


# -- Kohya import ----------------------------------------------------------------------------------------------
def kohya_file(sd, path):
    """A synthetic Kohya LoRA for the tiny pipeline: attention and a conv (LoCon) at ranks 8 and 2 with one
    network alpha (as sd-scripts writes them), text-encoder layers without alpha (scale 1); plus a key for a module that does not exist, a LoHa module and half a pair."""
    from safetensors.torch import save_file
    from tunesmith.diffusion.pipeline import load_diffusion_model
    model = load_diffusion_model(sd)
    g = torch.Generator().manual_seed(5)
    sd_ = {}

    def pair(stem, module, r, alpha=None):
        w = module.weight
        sd_[f"{stem}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g).half() * 0.3
        sd_[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g).half() * 0.3
        if alpha is not None:
            sd_[f"{stem}.alpha"] = torch.tensor(float(alpha)).half()

    u = model.unet
    pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
         u.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, 8, alpha=4)
    pair("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
         u.mid_block.attentions[0].transformer_blocks[0].attn2.to_out[0], 2, alpha=4)
    pair("lora_unet_up_blocks_1_resnets_0_conv1", u.up_blocks[1].resnets[0].conv1, 2, alpha=4)
    attn = model.text_encoder.encoder.layers[0].self_attn
    pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", attn.q_proj, 4)
    pair("lora_te_text_model_encoder_layers_0_self_attn_out_proj", attn.out_proj, 4)
    sd_["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 16)  # no such module
    sd_["lora_unet_mid_block_attentions_0_proj_out.hada_w1_a"] = torch.zeros(16, 4)  # LoHa
    sd_["lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)  # up half missing
    save_file(sd_, str(path))
    return path, len(sd_)


def test_kohya_import_reports_every_key_and_matches_diffusers(sd, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    from tunesmith.adapters import load_adapter
    from tunesmith.cli import main
    from tunesmith.diffusion.pipeline import load_diffusion_model
    file, n_keys = kohya_file(sd, tmp_path / "kohya.safetensors")
    assert main(["import-lora", str(file), "--base", str(sd), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    report = json.loads((tmp_path / "out" / "import_report.json").read_text())
    keys = [m["key"] for m in report["mapped"]] + [u["key"] for u in report["unmapped"]]
    assert sorted(keys) == sorted(load_file(str(file))) and report["keys"] == n_keys  # every key, once
    assert report["mapped_keys"] == 13 and report["modules"] == {"unet": 3, "text_encoder": 2}
    reasons = {u["key"]: u["reason"] for u in report["unmapped"]}
    assert "no module of this name" in reasons["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"]
    assert "LoHa" in reasons["lora_unet_mid_block_attentions_0_proj_out.hada_w1_a"]
    assert "lora_up.weight missing" in reasons["lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight"]
    assert "NOT MAPPED: 3 keys" in printed.out and "lora_unet_down_blocks_9" in printed.out
    assert "3 keys were NOT mapped" in printed.err

    # the imported adapter gives the UNet and text encoder that diffusers' own Kohya loader gives
    clean = tmp_path / "clean.safetensors"  # diffusers refuses (rather than reports) the bad keys: leave them out
    save_file({k: v for k, v in load_file(str(file)).items() if k not in reasons}, str(clean))
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.load_lora_weights(tmp_path, weight_name=clean.name)
    ours = load_diffusion_model(sd).eval()
    load_adapter(ours, tmp_path / "out")
    inputs = unet_inputs(ours.unet)
    torch.testing.assert_close(unet_out(ours.unet, inputs), unet_out(pipe.unet.eval(), inputs), rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[3, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours.text_encoder(ids)[0], pipe.text_encoder.eval()(ids)[0], rtol=1e-4, atol=1e-4)


def test_kohya_alpha_is_per_module():
    """Each module's scale is its own alpha / r (Kohya's rule), also when modules differ."""
    from torch import nn
    from tunesmith.diffusion.kohya import ImportReport, apply_plan, plan_import
    model = nn.Module()
    model.unet = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    g = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_0.lora_down.weight": torch.randn(2, 6, generator=g), "lora_unet_0.lora_up.weight": torch.randn(5, 2, generator=g),
               "lora_unet_0.alpha": torch.tensor(8.0), "lora_unet_1.lora_down.weight": torch.randn(3, 5, generator=g),
               "lora_unet_1.lora_up.weight": torch.randn(4, 3, generator=g)}  # no alpha: alpha = r
    report = ImportReport("mem", "mem")
    apply_plan(model, plan_import(tensors, model, report), report)
    t = tensors
    torch.testing.assert_close(model.unet[0].delta_weight("default"), t["lora_unet_0.lora_up.weight"] @ t["lora_unet_0.lora_down.weight"] * 4)
    torch.testing.assert_close(model.unet[1].delta_weight("default"), t["lora_unet_1.lora_up.weight"] @ t["lora_unet_1.lora_down.weight"])
    assert not report.unmapped and len(report.mapped) == 5


def test_kohya_alpha_must_be_one_finite_positive_number_and_0_means_rank(tmp_path):
    """A NaN alpha would write NaN into adapter_config.json (invalid JSON) and make the UNet output NaN; a
    vector alpha would silently use its first element. Each is refused naming the file and the key. Alpha 0 is
    read as alpha = r, as kohya-ss sd-scripts reads it."""
    from torch import nn
    from tunesmith.diffusion.kohya import ImportReport, plan_import
    from tunesmith.errors import TunesmithError
    model = nn.Module()
    model.unet = nn.Sequential(nn.Linear(6, 5))
    base = {"lora_unet_0.lora_down.weight": torch.randn(2, 6), "lora_unet_0.lora_up.weight": torch.randn(5, 2)}
    plan = plan_import({**base, "lora_unet_0.alpha": torch.tensor(0.0)}, model, ImportReport("k.safetensors", "b"))
    assert plan["unet.0"]["alpha"] == 2.0
    assert plan_import({**base, "lora_unet_0.alpha": torch.tensor([3.0])}, model, ImportReport("k", "b"))["unet.0"]["alpha"] == 3.0
    for alpha, got in ((float("nan"), "got nan"), (float("inf"), "got inf"), (-4.0, "got -4"), ([1.0, 2.0], "got shape (2,)")):
        with pytest.raises(TunesmithError) as e:
            plan_import({**base, "lora_unet_0.alpha": torch.tensor(alpha)}, model, ImportReport("k.safetensors", "b"))
        assert str(e.value).startswith("k.safetensors: lora_unet_0.alpha: the alpha must be one finite number >= 0")
        assert got in str(e.value) and "re-export it" in str(e.value)
    for key in base:  # a damaged factor: NaN would reach every image the module touches
        damaged = {**base, key: torch.full_like(base[key], float("nan"))}
        with pytest.raises(TunesmithError, match=f"k.safetensors: {key}: holds NaN or infinite values"):
            plan_import(damaged, model, ImportReport("k.safetensors", "b"))


def test_kohya_strict_refuses_unmapped_keys(sd, tmp_path):
    from tunesmith.diffusion.kohya import import_kohya
    from tunesmith.errors import TunesmithError
    file, _ = kohya_file(sd, tmp_path / "kohya.safetensors")
    with pytest.raises(TunesmithError, match="--strict: 3 of"):
        import_kohya(file, sd, tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(TunesmithError, match="which this command reads"):  # --out holding the source file
        import_kohya(file, sd, tmp_path, overwrite=True)
    assert file.exists()
    with pytest.raises(TunesmithError, match="is inside .*which this command reads"):  # inside the base pipeline
        import_kohya(file, sd, sd / "unet", overwrite=True)
    assert (sd / "unet" / "config.json").exists()


def test_kohya_sgm_named_unet_keys_map_as_diffusers_maps_them(sd, tmp_path):
    """kohya-ss's SDXL files name UNet modules the original (SGM) way: input_blocks / middle_block /
    output_blocks. Each lands on the module it names (written out below from the SGM layout) and gives the UNet
    diffusers' own loader gives; a key that does not place, and an SGM key naming the same module as a
    diffusers-named key, are reported, never dropped silently (diffusers drops every SGM key of a file that
    mixes both)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    from tunesmith.adapters import load_adapter
    from tunesmith.diffusion.kohya import import_kohya
    from tunesmith.diffusion.pipeline import load_diffusion_model
    u = load_diffusion_model(sd).unet  # layers_per_block 1; level 0 has attention, level 1 not
    assert u.config.layers_per_block == 1
    g = torch.Generator().manual_seed(7)
    modules = {
        "input_blocks_0_0": "conv_in",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_3_0_out_layers_3": "down_blocks.1.resnets.0.conv2",
        "middle_block_1_transformer_blocks_0_attn2_to_k": "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
        "output_blocks_1_1_conv": "up_blocks.0.upsamplers.0.conv",  # part 1: this level has no attention
        "output_blocks_3_1_proj_out": "up_blocks.1.attentions.1.proj_out",
        "output_blocks_2_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    }
    tensors = {}
    for body, name in modules.items():
        w = u.get_submodule(name).weight
        tensors[f"lora_unet_{body}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.3
        tensors[f"lora_unet_{body}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1] * (w.dim() - 2)), generator=g) * 0.3
        tensors[f"lora_unet_{body}.alpha"] = torch.tensor(2.0)
    file = tmp_path / "sgm.safetensors"
    save_file(tensors, str(file))
    report = import_kohya(file, sd, tmp_path / "out")
    assert not report.unmapped and len(report.mapped) == 3 * len(modules)
    landed = {m["key"].split(".")[0]: m["to"].rsplit(".", 2)[0] for m in report.mapped}
    assert landed == {f"lora_unet_{body}": f"unet.{name}" for body, name in modules.items()}

    # diffusers 0.42.1 puts an upsampler at part 1 on `attentions.1.conv` (no such module), so that key is left
    # out of the comparison; every other key, diffusers' SGM conversion is the oracle
    oracle = tmp_path / "oracle.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("lora_unet_output_blocks_1_1_conv")}, str(oracle))
    import_kohya(oracle, sd, tmp_path / "out-oracle")
    pipe = StableDiffusionPipeline.from_pretrained(sd)
    # the UNet config makes diffusers rename SGM keys (its SDXL pipeline passes it; without it, the SD pipeline
    # silently keeps only conv_in of this file)
    pipe.load_lora_weights(tmp_path, weight_name=oracle.name, unet_config=pipe.unet.config)
    assert sum(1 for m in pipe.unet.modules() if getattr(m, "lora_A", None)) == len(modules) - 1
    ours = load_diffusion_model(sd).eval()
    load_adapter(ours, tmp_path / "out-oracle")
    inputs = unet_inputs(ours.unet)
    torch.testing.assert_close(unet_out(ours.unet, inputs), unet_out(pipe.unet.eval(), inputs), rtol=1e-4, atol=1e-4)

    mixed = dict(tensors)  # plus: a diffusers-named key for a module an SGM key names, and one that does not place
    w = u.down_blocks[0].resnets[0].conv1.weight
    mixed["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = torch.zeros(2, *w.shape[1:])
    mixed["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] = torch.zeros(w.shape[0], 2, 1, 1)
    mixed["lora_unet_input_blocks_2_1_proj_in.lora_down.weight"] = torch.zeros(4, 16)  # the downsampler's slot
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    report = import_kohya(tmp_path / "mixed.safetensors", sd, tmp_path / "out2")
    reasons = {u["key"]: u["reason"] for u in report.unmapped}
    assert "names the same module as lora_unet_down_blocks_0_resnets_0_conv1" in \
        reasons["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
    assert "does not place in this UNet" in reasons["lora_unet_input_blocks_2_1_proj_in.lora_down.weight"]
    assert len(report.mapped) + len(report.unmapped) == len(mixed)  # every key, once


def test_kohya_sgm_keys_that_do_not_place_are_refused_with_their_reading(sd, tmp_path):
    """Output blocks have parts 0-2 and an upsampler only at the end of a level; a key outside that layout is
    not mapped (it would otherwise land on a real module, even displacing the genuine key). Long lists of bad
    keys are counted, not cut off silently; an empty file says so."""
    from safetensors.torch import save_file
    from tunesmith.diffusion.kohya import import_kohya, sgm_stem
    from tunesmith.errors import TunesmithError
    assert sgm_stem("lora_unet_output_blocks_0_1_conv", 1) is None  # not the last position of its level
    assert sgm_stem("lora_unet_output_blocks_1_1_conv", 1) == "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert sgm_stem("lora_unet_output_blocks_2_5_proj_in", 1) is None and sgm_stem("lora_unet_input_blocks_1_2_proj_in", 1) is None
    bad = {f"lora_unet_input_blocks_{i}_1_proj_in.lora_down.weight": torch.zeros(4, 16) for i in range(60, 120)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TunesmithError) as e:
        import_kohya(tmp_path / "bad.safetensors", sd, tmp_path / "out")
    assert "none of its 60 keys" in str(e.value) and "... and 10 more keys not mapped" in str(e.value)
    assert "an SGM UNet name, read as lora_unet_down_blocks_" in str(e.value)  # what it was taken for
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(TunesmithError, match="holds no tensors"):
        import_kohya(tmp_path / "empty.safetensors", sd, tmp_path / "out")

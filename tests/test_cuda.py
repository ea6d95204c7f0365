"""CUDA checks. CI has no GPU, so every test here is skipped there; on a GPU machine they run with the rest
(``scripts/gpu_check.sh`` runs them and ``freqar bench`` on a lent card).

What they hold: the fixture tensors that need no random draw match upstream's on the GPU as on the CPU;
every family generates on the GPU, deterministically for a seed; a disabled policy is bit-identical to
dense there too; sparse policies keep their index tensors on the right device; training runs and resumes
on the GPU; the benchmark reports CUDA memory.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from freqar.policies import make_policy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(autouse=True)
def exact_fp32() -> Iterator[None]:
    """TF32 matmuls and convolutions differ from fp32 by ~1e-3: the fixture tolerances are for fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    got = got.detach().float().cpu()
    want = want.float()
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= tol, f"max abs error {err:.2e} > {tol:.0e}"


def test_var_fixture_tensors_without_random_draws_match_on_cuda() -> None:
    """Encoder codes exact, teacher-forced logits and decodes within 1e-4, all computed on the GPU."""
    from freqar.conformance import _split, _vae_config, _var_config
    from freqar.io import load_safetensors, load_torch_file, read_json
    from freqar.models.var import VARTransformer
    from freqar.tokenizers.msvq import VQVAE

    d = FIXTURES / "var_tiny"
    cfg = read_json(d / "config.json")
    vae_cfg = _vae_config(cfg["vae"])
    vae, var = VQVAE(vae_cfg).eval(), VARTransformer(_var_config(cfg["var"], vae_cfg)).eval()
    vae.load_official(load_torch_file(d / "vae.pth"), "vae.pth")
    var.load_official(load_torch_file(d / "var.pth"), "var.pth")
    vae, var = vae.cuda(), var.cuda()
    exp = load_safetensors(d / "expected.safetensors")
    with torch.inference_mode():
        if "input.images" in exp:
            f = vae.encode_latent(exp["input.images"].cuda())
            idx, _ = vae.quantize.encode(f)
            assert torch.equal(torch.cat(idx, dim=1).cpu(), exp["enc.idx"])
        idx_list = [t.cuda() for t in _split(exp["enc.idx"], vae_cfg.patch_nums)]
        _close(vae.decode_indices(idx_list), exp["vae.recon_from_idx"])
        labels = cfg.get("teacher_forcing", {}).get("labels", [])
        if labels:
            x = exp["tf.x_BLCv_wo_first_l"].cuda()
            _close(var(torch.tensor(labels, device="cuda"), x), exp["tf.logits"])
        for g in cfg.get("generations", []):
            prefix = g.get("prefix", f"gen.{g['name']}.")
            # the canvas, not the codes: gumbel-smoothed last stages add soft embeddings
            _close(vae.decode_fhat(exp[prefix + "fhat"].cuda()).add(1).mul(0.5), exp[prefix + "img"])


def _tiny_var():  # type: ignore[no-untyped-def]
    from conftest import tiny_pipeline

    return tiny_pipeline(patch_nums=(1, 2, 3, 4, 6, 8)).to("cuda")


def test_var_generates_on_cuda_and_policies_keep_their_tensors_there() -> None:
    pipe = _tiny_var()
    dense = pipe.generate([0, 1, 2], seed=3, cfg=2.0)
    assert dense.images.device.type == "cuda" and dense.images.shape == (3, 3, 16, 16)
    assert 0 <= dense.images.min() and dense.images.max() <= 1
    assert torch.equal(dense.images, pipe.generate([0, 1, 2], seed=3, cfg=2.0).images)
    off = pipe.generate([0, 1, 2], seed=3, cfg=2.0, policy=make_policy("sparsevar", tau=0.0))
    for a, b in zip(dense.tokens, off.tokens, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dense.images, off.images)
    for name, knobs in (
        ("sparsevar", {"keep": 0.5, "start_stage": 3}),
        ("fastvar", {"keep": 0.5}),
    ):
        res = pipe.generate([0, 1, 2], seed=3, cfg=2.0, policy=make_policy(name, **knobs))
        assert torch.isfinite(res.images).all(), name
        assert sum(res.tokens_computed[-1]) < 3 * 64, name


def test_generation_waits_for_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage timing uses CUDA events: one synchronize per generation, not one per stage."""
    pipe = _tiny_var()
    pipe.generate([0], seed=0)  # warm-up
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (calls.append(1), real(*a))[1])
    out = pipe.generate([0, 1], seed=0, policy=make_policy("sparsevar", keep=0.5, start_stage=3))
    assert len(calls) == 1
    assert len(out.stage_seconds) == 6 and all(t > 0 for t in out.stage_seconds) and out.decode_seconds > 0


def test_bundled_emoji_model_on_cuda_decodes_like_the_cpu() -> None:
    from freqar.registry import bundled_dir, create_model

    if bundled_dir("emoji") is None:
        pytest.skip("emoji-default weights not in this checkout")
    cpu = create_model("emoji")
    out = cpu.generate([0, 5], seed=0)
    gpu = create_model("emoji").to("cuda")
    with torch.inference_mode():
        again = gpu.tokenizer.decode_indices([t.cuda() for t in out.tokens]).add(1).mul(0.5)
    _close(again, out.images, tol=1e-3)
    res = gpu.generate([0, 5], seed=0, policy=make_policy("sparsevar", keep=0.97, beta=1.0))
    assert res.images.shape == (2, 3, 128, 128) and torch.isfinite(res.images).all()


def test_far_generates_on_cuda_and_farskip_off_is_dense() -> None:
    from test_far import _tiny_pipe

    pipe = _tiny_pipe()
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    pipe = pipe.to("cuda")
    dense = pipe.generate([1, 2], seed=0, levels=(0, 2, 4, 7))
    assert dense.images.device.type == "cuda" and torch.isfinite(dense.images).all()
    assert torch.equal(dense.images, pipe.generate([1, 2], seed=0, levels=(0, 2, 4, 7)).images)
    off = pipe.generate([1, 2], seed=0, levels=(0, 2, 4, 7), policy=make_policy("farskip", tau=0.0))
    assert torch.equal(dense.images, off.images)
    half = make_policy("farskip", keep=0.5, start_stage=2)
    res = pipe.generate([1, 2], seed=0, levels=(0, 2, 4, 7), policy=half)
    assert torch.isfinite(res.images).all() and sum(res.tokens_computed[-1]) < 2 * 64


def test_hart_generates_on_cuda_with_every_excluded_option() -> None:
    from freqar.models.hart import EXCLUDED_OPTIONS
    from test_hart import text_batch, tiny_hart

    pipe = tiny_hart()
    t = text_batch(pipe, [16, 6])
    pipe = pipe.to("cuda")
    text = t.to("cuda")
    dense = pipe.generate(text=text, seed=5, cfg=3.0)
    assert dense.images.device.type == "cuda" and torch.isfinite(dense.images).all()
    off = pipe.generate(text=text, seed=5, cfg=3.0, policy=make_policy("sparsevar", tau=0.0))
    assert torch.equal(dense.images, off.images)
    for opt in EXCLUDED_OPTIONS:
        res = pipe.generate(
            text=text, seed=5, cfg=3.0, policy=make_policy("sparsevar", keep=0.5), excluded=opt
        )
        assert torch.isfinite(res.images).all() and sum(res.tokens_computed[-1]) < 2 * 64, opt


def test_infinity_generates_on_cuda_and_sparsevar_off_is_dense() -> None:
    from freqar.conformance_infinity import bsq_config, infinity_config
    from freqar.engine.generate import generate
    from freqar.engine.heads import BitwiseHead
    from freqar.io import load_safetensors, load_torch_file, read_json
    from freqar.models.infinity import Infinity
    from freqar.tokenizers.bsq import BSQVAE

    d = FIXTURES / "infinity_tiny"
    cfg = read_json(d / "config.json")
    vae = BSQVAE(bsq_config(cfg["vae"])).eval()
    model = Infinity(infinity_config(cfg["infinity"], cfg["vae"]["codebook_dim"])).eval()
    vae.load_official(load_torch_file(d / "vae.pth", key="vae"), "vae.pth")
    model.load_official(load_torch_file(d / "infinity.pth"), "infinity.pth")
    vae, model = vae.cuda(), model.cuda()
    exp = load_safetensors(d / "expected.safetensors")
    feats, lens = exp["text.features"].cuda(), exp["text.lens"]
    sched = [(s[1], s[2]) for s in cfg["scale_schedule"]]
    ref = tuple(cfg["rope_reference_scales"][-1][1:])

    def run(policy):  # type: ignore[no-untyped-def]
        S = len(sched)
        bound = model.bind(sched, ref)
        cond = model.condition_text(feats, lens, guided=True, cfg=(3.0,) * S)
        head = BitwiseHead(bound, [3.0] * S, [0.5] * S, top_k=0, top_p=0.9)
        gen = torch.Generator(device="cuda").manual_seed(3)
        return generate(bound, vae.stages(sched), condition=cond, head=head, policy=policy, generator=gen)

    dense = run(None)
    assert dense.images.device.type == "cuda" and torch.isfinite(dense.images).all()
    off = run(make_policy("sparsevar", tau=0.0))
    assert torch.equal(dense.images, off.images)
    sparse = run(make_policy("sparsevar", keep=0.5, alpha=2, beta=0.0, start_stage=4))
    assert torch.isfinite(sparse.images).all()


def test_training_runs_and_resumes_on_cuda(tmp_path: Path) -> None:
    """Tokenizer (with the critic) then VAR on the GPU: losses fall, the export loads, and a run killed after
    a checkpoint resumes to the same losses (to 1e-5: GPU kernels need not be bitwise repeatable)."""
    from freqar.train.dist import DistContext
    from freqar.train.run import train_tokenizer, train_var
    from test_train import _run_until
    from train_helpers import gan_config, tok_config, var_config, write_manifest_dataset

    ctx = DistContext(device="cuda")
    data = write_manifest_dataset(tmp_path / "shapes")
    tok = train_tokenizer(gan_config(tok_config(data, steps=12)), tmp_path / "tok", ctx=ctx, progress=False)
    assert tok.history["loss"][-1] < tok.history["loss"][0]
    cfg = var_config(data, tmp_path / "tok", steps=4, ckpt_every=2)
    run = functools.partial(train_var, ctx=ctx)
    full = run(cfg, tmp_path / "full", progress=False)
    _run_until(run, cfg, tmp_path / "cut", stop_after=2)
    resumed = run(cfg, tmp_path / "cut", progress=False)
    for a, b in zip(resumed.history["loss"], full.history["loss"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))


def test_bench_reports_cuda_memory() -> None:
    from freqar.bench import get_scenario, run_bench

    report = run_bench(
        get_scenario("tiny"), methods=["dense", "sparsevar"], taus=[0.0], budgets=[0.5], runs=1, device="cuda"
    )
    assert report["peak_memory_kind"] == "cuda_max_allocated"
    assert report["device"].startswith("cuda")
    assert all(r["peak_memory_mb"] > 0 for r in report["results"])

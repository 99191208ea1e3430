"""The pvm-kernels command line, driven in subprocesses exactly as a user runs it."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")
pytest.importorskip("matplotlib")

from pvm_kernels import available_backends  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def cli(*args, cwd=None, timeout=300, entry=None):
    cmd = (entry or [sys.executable, "-m", "pvm_kernels"]) + [str(a) for a in args]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user has it
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_png_size(path):
    """(width, height) of a valid PNG; fails on anything else."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND", "truncated PNG"
    return struct.unpack(">II", data[16:24])


def assert_one_line_error(proc, code, *fragments):
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- info --------------------------------------------------------------------------------------

def test_info_reports_versions_and_backends(tmp_path):
    proc = cli("info", "--json", tmp_path / "info.json")
    assert proc.returncode == 0, proc.stderr
    assert f"torch             {torch.__version__.split('+')[0]}" in proc.stdout
    report = json.loads((tmp_path / "info.json").read_text())
    assert report["versions"]["torch"] == torch.__version__.split("+")[0] or \
        torch.__version__.startswith(report["versions"]["torch"])
    usable_cpu = [n for n, b in report["backends"].items() if b["cpu"]["usable"]]
    # The subprocess runs without TRITON_INTERPRET (this test process has it set).
    assert usable_cpu == [b for b in available_backends("cpu") if b != "triton"]
    assert report["backends"]["cpu"]["cpu"]["default"] is ("cpu" in usable_cpu)
    for name, b in report["backends"].items():  # every unusable entry says why
        for device_type in ("cpu", "cuda"):
            assert b[device_type]["usable"] or b[device_type]["reason"], (name, device_type)
    if not HAS_GPU:
        assert "no CUDA GPU visible" in proc.stdout
        assert "CUDA is not available" in report["backends"]["triton"]["cuda"]["reason"]


def test_console_script_and_module_agree():
    script = shutil.which("pvm-kernels")
    assert script, "the pvm-kernels console script is not installed (pip install -e .)"
    a, b = cli("--version", entry=[script]), cli("--version")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    assert a.stdout.startswith("pvm-kernels ")


@pytest.mark.parametrize("command", ["demo", "analyze", "bench", "info"])
def test_every_option_is_documented(command, capsys):
    # In this process (the console script's own path is test_console_script_and_module_agree)
    from pvm_kernels.cli import main
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    options = {"demo": ["--model", "--device", "--dtype", "--backends", "--max-new-tokens",
                        "--gate", "--seed", "--json", "--debug"],
               "analyze": ["--model", "--device", "--max-new-tokens", "--out-dir", "--no-plot"],
               "bench": ["--shapes", "--batch", "--ops", "--backends", "--repeats", "--out-dir",
                         "--no-plot", "--no-progress"],
               "info": ["--json", "--debug"]}[command]
    for option in options:
        assert option in out, option


# ---- errors ------------------------------------------------------------------------------------

class InProcess:
    """main() called in this process: same parsing and error path, no interpreter start-up."""

    def __init__(self, code, stderr):
        self.returncode, self.stderr = code, stderr


def cli_in_process(capsys, *args):
    from pvm_kernels.cli import main
    code = main([str(a) for a in args])
    return InProcess(code, capsys.readouterr().err)


def test_user_error_in_a_subprocess_is_one_line_with_status_2(tmp_path):
    assert_one_line_error(cli("demo", "--model", tmp_path / "missing"), 2, "--model", "no such directory")


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    run = lambda *a: cli_in_process(capsys, *a)  # noqa: E731
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("analyze", "--model", tmp_path / "empty"), 2, "no config.json")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    assert_one_line_error(run("demo", "--model", tmp_path / "other"), 2, "'llama'", "qwen3_vl")
    assert_one_line_error(run("bench", "--shapes", "12"), 2, "--shapes", "'12'")
    assert_one_line_error(run("bench", "--shapes", "0x5"), 2, "--shapes", "T >= 1")
    assert_one_line_error(run("bench", "--ops", "attention"), 2, "--ops", "attention")
    assert_one_line_error(run("bench", "--backends", "nope"), 2, "unknown backend 'nope'")
    assert_one_line_error(run("bench", "--backends", "cuda", "--device", "cpu"), 2,
                          "'cuda' cannot run on cpu")
    assert_one_line_error(run("demo", "--max-new-tokens", "1"), 2, "--max-new-tokens")
    (tmp_path / "file").write_text("")
    assert_one_line_error(run("bench", "--out-dir", tmp_path / "file" / "sub"), 2, "--out-dir")
    if not HAS_GPU:
        assert_one_line_error(run("bench", "--device", "cuda"), 2, "--device cuda", "no CUDA GPU")
    with pytest.raises(Exception, match="no such directory"):  # --debug: the real exception
        cli_in_process(capsys, "demo", "--model", tmp_path / "missing", "--debug")


def test_unexpected_failure_is_one_line_status_1_and_debug_shows_traceback(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "qwen3_vl"}')  # no weights at all
    proc = cli("demo", "--model", bad)
    assert_one_line_error(proc, 1, "--debug")
    debug = cli("demo", "--model", bad, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# ---- demo --------------------------------------------------------------------------------------

def test_demo_every_backend_agrees_with_the_reference(tmp_path):
    proc = cli("demo", "--max-new-tokens", 4, "--json", tmp_path / "demo.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "demo.json").read_text())
    names = [r["backend"] for r in result["results"]]
    # The demo runs on the GPU when there is one; on CPU Triton runs in its interpreter.
    expected = available_backends("cuda") if HAS_GPU else available_backends("cpu") + ["triton"]
    assert sorted(names) == sorted(set(expected)), names
    assert result["pvm_effect"] > 0.05, "gate non-zero: PVM must change the logits"
    assert result["visual_tokens"] == 80 and result["gate"] == 1.0
    for r in result["results"]:
        assert r["passed"] and r["tokens_equal"] == 4
        assert r["max_rel_err_logits"] < 1e-4
        assert r["prefill_ms"] > 0 and r["decode_ms_per_token"] > 0
    assert "PASS" in proc.stdout and "decode ms/token" in proc.stdout


def _write_tokenizer(path):
    """A word-level tokenizer with Qwen's vision token names and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "describe this image in detail . <|im_start|> <|im_end|> user assistant".split()
    vocab = {f"w{i}": i for i in range(400)}
    vocab.update({w: 400 + i for i, w in enumerate(words)})
    vocab.update({w: 500 + i for i, w in enumerate(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    hf.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} "
                        "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> "
                        "assistant {% endif %}")
    hf.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from pvm_kernels.integrations import apply_pvm_to_qwen3_vl, set_pvm_gate
    from pvm_kernels.integrations.qwen3_vl_inputs import image_processor_for
    from pvm_kernels.integrations.tiny_qwen3_vl import small_qwen3_vl
    root = tmp_path_factory.mktemp("ckpt")
    model = small_qwen3_vl(seed=3)
    model.save_pretrained(root / "plain")
    apply_pvm_to_qwen3_vl(model, pvm_hidden_size=128)
    set_pvm_gate(model, 0.5)
    model.save_pretrained(root / "pvm")
    image_processor_for(model.config).save_pretrained(root / "pvm")
    _write_tokenizer(root / "pvm")
    return root


def test_demo_on_a_local_pvm_checkpoint_keeps_its_trained_gate(checkpoints, tmp_path):
    proc = cli("demo", "--model", checkpoints / "pvm", "--device", "cpu", "--backends", "cpu",
               "--max-new-tokens", 3,
               "--json", tmp_path / "d.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "d.json").read_text())
    assert "PVM checkpoint" in result["model"] and result["gate"] == 0.5
    assert [r["backend"] for r in result["results"]] == ["reference", "cpu"]
    assert all(r["passed"] for r in result["results"])
    # The prompt came from the checkpoint's chat template: 80 image tokens + template words.
    assert result["visual_tokens"] == 80 and result["prompt_tokens"] > 82
    assert "generated text (reference):" in proc.stdout


def test_demo_on_a_plain_checkpoint_adds_pvm(checkpoints, tmp_path):
    proc = cli("demo", "--model", checkpoints / "plain", "--backends", "reference",
               "--max-new-tokens", 2, "--gate", 0.25, "--json", tmp_path / "d.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "d.json").read_text())
    assert "plain Qwen3-VL" in result["model"] and result["gate"] == 0.25
    assert result["pvm_layers"] == [1, 3, 4]  # the paper's relative depths in 6 layers


# ---- analyze -----------------------------------------------------------------------------------

def test_analyze_measures_dilution_and_plots_it(tmp_path):
    steps = 40
    proc = cli("analyze", "--max-new-tokens", steps, "--out-dir", tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "out" / "analyze.json").read_text())
    nv, prompt = result["visual_tokens"], result["prompt_tokens"]
    assert result["generated"] == list(range(steps))
    assert result["context_length"][0] == prompt
    shares = result["self_attention_visual_share"]
    assert len(shares) == 6 and all(len(v) == steps for v in shares.values())
    assert all(0.0 <= s <= 1.0 + 1e-6 for v in shares.values() for s in v)
    mean = result["self_attention_visual_share_mean"]
    assert mean[-1] < 0.8 * mean[0], "the visual share must dilute as text grows"
    # Random weights attend almost uniformly, so the share is close to Nv / L.
    assert 0.7 * nv < result["fit"]["a"] < 1.3 * nv and result["fit"]["r2"] > 0.5
    assert set(result["pvm_visual_mass"]) == {str(i) for i in result["pvm_layers"]}
    for mass in result["pvm_visual_mass"].values():
        assert len(mass) == steps and all(abs(m - 1.0) < 1e-5 for m in mass)
    w, h = read_png_size(tmp_path / "out" / "analyze.png")
    assert w > 400 and h > 300


def test_analyze_no_plot_writes_json_only(tmp_path):
    proc = cli("analyze", "--max-new-tokens", 3, "--out-dir", tmp_path, "--no-plot")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "analyze.json").exists() and not (tmp_path / "analyze.png").exists()


# ---- bench -------------------------------------------------------------------------------------

def test_bench_writes_times_errors_and_a_bar_chart(tmp_path):
    proc = cli("bench", "--device", "cpu", "--shapes", "8x16,5x33", "--ops", "retrieval,merge,block",
               "--repeats", 2, "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    backends = [b for b in available_backends("cpu") if b != "triton"]
    # retrieval/block: 2 shapes x (fwd, fwd+bwd) + 2 decode Nv; merge: 2 T x 2 + 1 decode.
    assert len(report["results"]) == (6 + 5 + 6) * len(backends)
    assert {r["backend"] for r in report["results"]} == set(backends)
    for r in report["results"]:
        assert len(r["times_ms"]) == 2 and all(t > 0 for t in r["times_ms"])
        if r["mode"] == "fwd+bwd":
            assert r["max_rel_err"] is None
        else:
            assert r["max_rel_err"] < 1e-4, r
    assert report["versions"]["torch"] and report["device"].startswith("cpu")
    assert "/17]" not in proc.stderr and f"{len(report['results'])}/{len(report['results'])}" in proc.stderr
    read_png_size(tmp_path / "bench.png")


def test_bench_triton_on_cpu_needs_the_interpreter_explicitly(tmp_path):
    if HAS_GPU:
        pytest.skip("triton runs natively here")
    proc = cli("bench", "--backends", "triton", "--out-dir", tmp_path)
    assert_one_line_error(proc, 2, "'triton' cannot run on cpu", "TRITON_INTERPRET=1")

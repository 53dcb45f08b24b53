"""The `dostream` command as a user runs it: subprocess tests of the public contracts."""

import json

import pytest
from conftest import EXAMPLES, run_cli

from dostream.cli.main import COMMANDS


def test_help_lists_commands():
    out = run_cli("--help").stdout
    for cmd in ("render", "show", "stem", "theory"):
        assert cmd in out
    assert run_cli("nope", check=False).returncode == 2


def test_render_contract(tok):
    out = run_cli("render", EXAMPLES / "stem_streams.jsonl", "--tokenizer", "smollm2", "--view", "observational").stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["stem-wrong-attempt", "stem-correct-attempt"]
    for r in rows:
        assert set(r) == {"id", "text", "input_ids", "labels", "offsets", "authors", "segments"}
        n = len(r["input_ids"])
        assert len(r["labels"]) == len(r["offsets"]) == len(r["authors"]) == n
        assert all(lab in (-100, t) for lab, t in zip(r["labels"], r["input_ids"]))
        assert all(o is None or (0 <= o[0] < o[1] <= len(r["text"])) for o in r["offsets"])
        assert all(set(s) == {"author", "start", "end"} for s in r["segments"])
        assert tok.decode(r["input_ids"], skip_special_tokens=False) == r["text"]
    inter = [
        json.loads(line)
        for line in run_cli("render", EXAMPLES / "stem_streams.jsonl", "--view", "interventional").stdout.splitlines()
    ]
    assert [r["input_ids"] for r in inter] == [r["input_ids"] for r in rows]
    assert sum(x != -100 for x in inter[0]["labels"]) < sum(x != -100 for x in rows[0]["labels"])


def test_render_max_length_and_dropping():
    proc = run_cli("render", EXAMPLES / "stem_streams.jsonl", "--view", "oracle", "--max-length", "12")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    # The correct-attempt stream has no oracle tokens: dropped and counted, not printed.
    assert [r["id"] for r in rows] == ["stem-wrong-attempt"]
    assert len(rows[0]["input_ids"]) == 12
    assert '"dropped_no_supervised": 1' in proc.stderr


def test_render_chat_form_with_template():
    out = run_cli("render", EXAMPLES / "tool_chat.jsonl", "--chat-template").stdout
    r = json.loads(out)
    assert r["text"].startswith("<|im_start|>system\n")
    assert {"teacher", "tool", "agent", "protocol", "context", "user"} == set(r["authors"])


def test_render_reads_stdin_and_role_map():
    line = json.dumps(
        {"id": "c", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    r = json.loads(run_cli("render", "-", "--role-map", "assistant=teacher", input=line + "\n").stdout)
    assert "teacher" in r["authors"]


@pytest.mark.parametrize(
    "given, spincount",
    [
        ({}, "10000"),
        ({"OMP_NUM_THREADS": "2"}, "10000"),
        ({"GOMP_SPINCOUNT": "300000"}, "300000"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "None"),
    ],
)
def test_the_command_sets_a_short_openmp_spin_unless_the_user_chose(given, spincount):
    """Before torch loads (so its OpenMP runtime reads it), and never over the user's own setting."""
    import os
    import subprocess
    import sys

    from dostream.openmp import OPENMP_WAIT_VARIABLES

    code = (
        "import os, sys; from dostream.cli.main import main; print('torch' in sys.modules); "
        "main(['--version']); print(os.environ.get('GOMP_SPINCOUNT'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARIABLES} | given
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    torch_loaded, _version, seen = out.stdout.split()
    assert (torch_loaded, seen) == ("False", spincount)


def test_bad_input_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"id": "a", "segments": [{"author": "user", "text": "ok"}]}\n{"id": "b", "segments": [{"author": "bot", "text": "x"}]}\n'
    )
    proc = run_cli("render", bad, check=False)
    assert proc.returncode != 0
    assert f"{bad}:2: field 'segments[0].author': unknown author 'bot'" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = run_cli("render", bad, "--skip-invalid")
    assert len(ok.stdout.splitlines()) == 1 and "skipping invalid stream" in ok.stderr
    assert "unknown view" in run_cli("render", bad, "--view", "robots", check=False).stderr


def test_show_terminal_and_html(tmp_path):
    page = tmp_path / "show.html"
    proc = run_cli("show", EXAMPLES / "stem_streams.jsonl", "--view", "oracle", "--html", page)
    out = proc.stdout
    assert "[LOSS] oracle" in out and "[MASK] agent" in out
    assert "supervised fraction" in out
    html = page.read_text()
    assert html.startswith("<!doctype html>") and 'title="id ' in html and "author oracle" in html
    obs = run_cli("show", EXAMPLES / "tutoring.jsonl", "--view", "observational").stdout
    assert "[LOSS] agent" in obs


def _bad_inputs(tmp_path) -> dict[str, list]:
    """One user mistake per subcommand of the dispatch table (a missing file where it reads one)."""
    missing = tmp_path / "missing.jsonl"
    return {
        "demo": ["demo", "--model", "tiny", "--n-facts", "0", "--out", tmp_path / "demo"],
        "import": ["import", missing, "--out", tmp_path / "imported.jsonl", "--assistant", "other"],
        "export": ["export", missing, "--out", tmp_path / "exported"],
        "render": ["render", missing],
        "show": ["show", missing],
        "train": ["train", missing, "--model", "tiny", "--out", tmp_path / "train"],
        "sample": ["sample", "--model", "tiny", "--prompt", "Hi", "--n", "0"],
        "stem": ["stem", "verify", "--input", missing],
        "reproduce": ["reproduce", "delusion", "--report-only", "--out", tmp_path / "nowhere"],
        "report": ["report", tmp_path / "nowhere"],
        "agent": ["agent", "run", "--env", "support", "--model", "tiny", "--out", tmp_path / "agent", "--views", "x"],
        "streams": ["streams", "export", tmp_path / "nowhere"],
        "serve": ["serve", "--model", "tiny", "--store", tmp_path / "serve", "--client-assistant", "agent"],
        "theory": ["theory", "--out", tmp_path / "theory", "--verifier-hit", "1.0"],
        "memory": ["memory", "list", tmp_path / "nowhere"],
        "forget": ["forget", "--store", tmp_path / "nowhere", "--user", "carol"],
    }


def test_every_command_has_a_bad_input_case(tmp_path):
    assert set(_bad_inputs(tmp_path)) == set(COMMANDS), "give every subcommand a bad input here"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_reports_a_user_error_in_one_line(tmp_path, name):
    """`dostream CMD: message` on stderr, exit status 2, no traceback: the one error convention."""
    proc = run_cli(*_bad_inputs(tmp_path)[name], check=False)
    assert proc.returncode == 2, (name, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, (name, proc.stderr)
    assert proc.stderr.splitlines()[-1].startswith(f"dostream {name}: "), (name, proc.stderr)
    assert not (tmp_path / "train").exists() and not (tmp_path / "agent").exists() and not (tmp_path / "demo").exists()
    assert not (tmp_path / "imported.jsonl").exists() and not (tmp_path / "exported").exists()


def test_serve_learn_refuses_bad_flags_in_one_line(tmp_path):
    """`dostream serve --learn`: a bad control file names file, line and field; a learning flag
    without --learn is refused; both before anything loads or is written."""
    control = tmp_path / "control.jsonl"
    control.write_text('{"messages": [{"role": "user", "content": "Hi"}], "expect": ["Hello"]}\n{"messages": []}\n')
    store = tmp_path / "serve"
    for args, message in [
        (["--learn", "--control", control], f"{control}:2: field 'messages': expected a non-empty list"),
        (["--learn", "--control", tmp_path / "missing.jsonl"], "--control: cannot read"),
        (["--control", control], "--control takes effect with --learn only"),
        (["--learn", "--gate-tolerance", "-1"], "argument --gate-tolerance"),
    ]:
        proc = run_cli("serve", "--model", "tiny", "--store", store, *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert message in proc.stderr.splitlines()[-1], proc.stderr
    assert not store.exists()


def test_user_error_messages(tmp_path):
    """What the converted library errors say (the file, the view, the flag at fault)."""
    missing = tmp_path / "missing.jsonl"
    proc = run_cli("render", missing, check=False)
    assert proc.stderr.strip() == f"dostream render: {missing}: No such file or directory"
    proc = run_cli("render", EXAMPLES / "stem_streams.jsonl", "--view", "robots", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("dostream render: --view: unknown view 'robots'")
    proc = run_cli("show", EXAMPLES / "stem_streams.jsonl", "--role-map", "assistant", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dostream show: --role-map: expected ROLE=AUTHOR or ROLE=ROLE, got 'assistant'"
    proc = run_cli("sample", "--model", "tiny", "--prompt", "Hi", "--top-p", "0", check=False)
    assert proc.returncode == 2 and "argument --top-p: must be > 0, got 0.0" in proc.stderr  # the field's bound
    proc = run_cli("stem", "verify", "--input", missing, check=False)
    assert proc.stderr.strip() == f"dostream stem: cannot read {missing}: No such file or directory"


# -- reproduce and report: one preset mechanism, one run-directory guard ----------------------


def test_reproduce_flags_start_from_the_preset():
    """`--preset` picks a config instance; every field is a flag defaulting to the preset's value,
    and `--set FIELD=VALUE` is the same flag spelled another way (later flags win)."""
    import dostream.experiments.delusion.run as delusion
    import dostream.experiments.stem.run as stem
    from dostream.cli.reproduce import _parse

    for module in (stem, delusion):
        for name, preset in module.PRESETS.items():
            assert _parse(module.EXPERIMENT, module, ["--preset", name])[1] == preset
    args, p = _parse("stem", stem, ["--preset", "smoke", "--set", "n_test=5", "--set", "dapo=no", "--lr", "0.5"])
    assert (p.n_test, p.dapo, p.lr, p.model, args.seeds) == (5, False, 0.5, "tiny", 1)
    assert stem.PRESETS["quick"].lr == 1e-3 and _parse("stem", stem, [])[1].lr == 1e-3  # quick is the default
    _, cfg = _parse("delusion", delusion, ["--preset", "smoke", "--set", "lr=0.5", "--no-progress"])
    assert (cfg.lr, cfg.progress, cfg.seeds, cfg.lora_r) == (0.5, False, 2, 4)
    proc = run_cli("reproduce", "stem", "--preset", "smoke", "--set", "bogus=1", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("dostream reproduce: --set 'bogus=1': expected FIELD=VALUE")


def test_run_dir_guard(tmp_path):
    """`config.check_run_dir`: a run directory holds one experiment and one config; the refusal
    names every differing field, old -> new."""
    import dataclasses

    import pytest

    from dostream.config import RunDirError, check_run_dir, write_run_record
    from dostream.experiments.delusion.run import PRESETS

    smoke = PRESETS["smoke"]
    assert check_run_dir(tmp_path, smoke, experiment="delusion") is None  # nothing there yet
    write_run_record(tmp_path, smoke, {"preset": "smoke"}, experiment="delusion")
    assert check_run_dir(tmp_path, smoke, experiment="delusion")["preset"] == "smoke"
    with pytest.raises(RunDirError, match="pass --resume"):
        check_run_dir(tmp_path, smoke, experiment="delusion", resume=False)
    with pytest.raises(RunDirError, match="holds a 'delusion' run, not a 'stem' one"):
        check_run_dir(tmp_path, smoke, experiment="stem")
    other = PRESETS["quick"]
    with pytest.raises(RunDirError, match=r"different config \(.*lr: 0\.001 -> 0\.0005.*\)") as e:
        check_run_dir(tmp_path, other, experiment="delusion")
    assert "n_seen: 4 -> 16" in str(e.value) and "seeds" in str(e.value)
    more = dataclasses.replace(smoke, seeds=5, progress=False)
    assert check_run_dir(tmp_path, more, experiment="delusion", may_change=("seeds", "progress"))
    record = json.loads((tmp_path / "config.json").read_text())
    del record["experiment"]  # a record written before every record named its experiment
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert check_run_dir(tmp_path, smoke, experiment="delusion")


def test_run_records_name_the_cpu_and_its_features(tmp_path):
    """Timings from CPUs of different features do not compare (bf16 is emulated without AMX or
    avx512_bf16), so every run record and benchmark names the CPU and which features it has."""
    from dostream.config import cpu, environment

    info = tmp_path / "cpuinfo"
    core = "processor\t: {}\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 fma avx512f amx_bf16 amx_tile\n\n"
    info.write_text(core.format(0) + core.format(1))
    assert cpu(info) == "Test CPU 9000 (avx2, fma, avx512f, amx_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert cpu(info) == "Old CPU (none of avx2/fma/avx512f/avx512_bf16/amx_bf16)"
    assert cpu(tmp_path / "missing")  # not Linux: what platform says, never an error
    assert environment()["cpu"] == cpu()


def test_report_refuses_a_run_without_a_report(tmp_path):
    from dataclasses import dataclass

    from dostream.config import write_run_record

    @dataclass
    class Nothing:
        pass

    write_run_record(tmp_path, Nothing(), experiment="train")
    proc = run_cli("report", tmp_path, check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"dostream report: {tmp_path} is a 'train' run; reports exist for stem, delusion, dual-lora, agent"
    )


@pytest.mark.parametrize("command", ["render", "show"])
def test_a_closed_pipe_ends_quietly(tmp_path, command):
    import subprocess
    import sys

    many = tmp_path / "many.jsonl"
    lines = (EXAMPLES / "tool_chat.jsonl").read_text().splitlines()
    many.write_text("".join(line.replace('"id": "', f'"id": "{k}-', 1) + "\n" for k in range(200) for line in lines))
    # The reader takes one line and goes away; the writer must not print a traceback.
    proc = subprocess.run(
        f"{sys.executable} -m dostream.cli {command} {many} | head -n 1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


@pytest.mark.parametrize(
    "args,flag",
    [
        (["train", EXAMPLES / "stem_streams.jsonl", "--out", "X", "--batch-size", "-2"], "--batch-size"),
        (["train", EXAMPLES / "stem_streams.jsonl", "--out", "X", "--epochs", "0"], "--epochs"),
        (["train", EXAMPLES / "stem_streams.jsonl", "--out", "X", "--max-steps", "-3"], "--max-steps"),
        (["reproduce", "stem", "--preset", "smoke", "--set", "n_test=-5", "--out", "X"], "--n-test"),
        (["reproduce", "delusion", "--preset", "smoke", "--p-lie", "1.5", "--out", "X"], "--p-lie"),
        (["stem", "generate", "--split", "sft", "--n", "-1"], "--n"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_flag(tmp_path, args, flag):
    proc = run_cli(*[tmp_path / "out" if a == "X" else a for a in args], check=False)
    assert proc.returncode == 2 and f"argument {flag}: must be" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_configs_are_range_checked_in_the_library_too():
    from dostream.train import TrainConfig, train

    with pytest.raises(ValueError, match="epochs: must be >= 1, got 0"):
        train([{"input_ids": [1, 2], "labels": [1, 2]}], TrainConfig(model="tiny", epochs=0), "unused")


def test_stem_generate_beyond_the_value_space_is_a_clear_error():
    proc = run_cli("stem", "generate", "--split", "sft", "--n", "100000", check=False)
    assert proc.returncode == 2 and "value space is exhausted" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["train", EXAMPLES / "stem_streams.jsonl", "--model", "tiny", "--out", "F/run"],
        ["show", EXAMPLES / "stem_streams.jsonl", "--html", "F/page.html"],
        ["reproduce", "delusion", "--preset", "smoke", "--out", "F/rep"],
        ["demo", "--model", "tiny", "--n-facts", "2", "--out", "F/demo"],
    ],
)
def test_an_unusable_output_path_is_a_one_line_error(tmp_path, args):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    proc = run_cli(*[str(a).replace("F/", f"{in_the_way}/") for a in args], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"dostream {args[0]}: ")

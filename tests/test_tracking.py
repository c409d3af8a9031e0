"""MLflow as a researcher sees it (issue 16) and runs keyed by fingerprint (issue 15.4), on a tiny run logged
to a real sqlite store; the samples grids; the live step logger against a real and an unreachable store."""

import json
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from anonrisk.config import load_config
from anonrisk.pipeline import Pipeline

TINY = ["progress=false", "name=tiny", "anonymizers=[blur]", "attacks=[contrastive,edge]", "data.synthetic.identities=12",
        "data.synthetic.images_per_identity=4", "train.backbone=test_resnet", "train.steps=8", "train.batch_size=16",
        "train.per_identity=2", "train.checkpoint_every=4", "evaluate.bootstrap=50", "evaluate.protocols=[full-ref]"]


def tiny_cfg(tmp, *overrides):
    return load_config("configs/quickstart.yaml", [f"runs_dir={tmp}/runs", f"results_dir={tmp}/results",
                                                    f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", *TINY, *overrides])


def mlflow_runs(tmp):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("anonrisk-quickstart")
    return client, client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracking")
    # system metrics every 0.5 s (MLflow reads the variable): a quiet machine runs a child in a few seconds
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    t0 = time.time()
    try:
        doc = Pipeline(tiny_cfg(tmp)).run()
    finally:
        mp.undo()
    return tmp, doc, (t0, time.time())


@pytest.mark.slow  # the tiny run: about 30 s on 2 quiet cores, shared by the three
def test_parent_and_child_runs_follow_the_work(tiny_run):
    tmp, doc, (t0, t1) = tiny_run
    client, runs = mlflow_runs(tmp)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert len(runs) == 2 and parent.info.status == child.info.status == "FINISHED"
    for r in (parent, child):  # opened when the work starts, closed when it ends, real clock
        assert t0 * 1000 - 1000 <= r.info.start_time < r.info.end_time <= t1 * 1000 + 1000
    assert parent.info.start_time <= child.info.start_time and child.info.end_time <= parent.info.end_time
    # open across anonymize + train + evaluate, not a short write after them: the child starts before the first
    # anonymized image is written and ends after the last evaluation is marked done (20 ms: coarse file clocks)
    images = [p.stat().st_mtime * 1000 for p in (tmp / "runs" / "anonymize").rglob("images/*/*")]
    evaluated = [p.stat().st_mtime * 1000 for p in (tmp / "runs" / "evaluate").glob("*/DONE")]
    assert images and len(evaluated) >= 2
    assert child.info.start_time <= min(images) + 20 and max(evaluated) <= child.info.end_time + 20
    # a child reads at a glance: few headline metrics, every protocol in a table and in result.json
    headline = {k for k in child.data.metrics if not k.startswith("system/")}
    assert len(headline) <= 40 and {"worst/top1", "worst/top1_norm", "contrastive/top1", "edge/top1_norm", "leakage/edge_ssim",
                                    "utility/ssim", "utility/psnr", "train/loss", "train/lr"} <= headline, sorted(headline)
    card = doc["results"]["blur"]
    main = card["attacks"]["contrastive"]["protocols"]["full-ref/exclude-source"]["top1"]
    assert child.data.metrics["contrastive/top1"] == pytest.approx(main["value"])
    assert any(k.startswith("system/") for k in child.data.metrics)  # psutil is installed here
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"protocols.json", "result.json", "card_blur.png"} <= artifacts
    table = json.loads(Path(client.download_artifacts(child.info.run_id, "protocols.json", str(tmp))).read_text())
    assert len(table["data"]) == sum(len(r["protocols"]) for r in card["attacks"].values() if "protocols" in r)
    # one loss point per logged step, stamped when the step ran
    steps = [json.loads(line) for line in (tmp / "runs").glob("train/**/log.jsonl").__next__().read_text().splitlines()]
    history = client.get_metric_history(child.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [e["step"] for e in steps] == list(range(8))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([e["loss"] for e in steps])
    assert all(child.info.start_time <= m.timestamp <= child.info.end_time for m in history)
    # the parent: the run's params and a summary; artifacts under runs_dir, not ./mlruns
    assert parent.data.params["train.backbone"] == "test_resnet" and parent.data.params["anonymizers"] == "blur"
    assert parent.data.metrics["worst_top1/blur"] == pytest.approx(child.data.metrics["worst/top1"])
    assert parent.info.artifact_uri.startswith((tmp / "mlartifacts").as_uri())
    assert {"metrics.json", "report.md", "overview.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "plots/samples_blur.png" not in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}


@pytest.mark.slow  # the tiny run: about 30 s on 2 quiet cores, shared by the three
def test_rerun_logs_nothing_and_changed_settings_supersede(tiny_run, capsys):
    from anonrisk.cli import main

    tmp, doc, _ = tiny_run
    _, before = mlflow_runs(tmp)
    assert main(["run", "configs/quickstart.yaml", f"runs_dir={tmp}/runs", f"results_dir={tmp}/results",
                 f"tracking.tracking_uri=sqlite:///{tmp}/mlflow.db", *TINY]) == 0
    out = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp}/mlflow.db" in out and before[0].info.experiment_id in out
    _, same = mlflow_runs(tmp)
    assert {r.info.run_id for r in same} == {r.info.run_id for r in before}  # same plan, same numbers: nothing new
    # issue 15.4: other settings, other numbers; the old runs say they are superseded, the new ones hold the new numbers
    again = Pipeline(tiny_cfg(tmp, "evaluate.bootstrap=30", "evaluate.protocols=[full-ref,single-ref]", "tracking.log_images=true")).run(
        overwrite=True)  # other settings into the same results/<name>/ (issue 15: refused without --overwrite)
    _, runs = mlflow_runs(tmp)
    new = [r for r in runs if r.info.run_id not in {b.info.run_id for b in before}]
    old = [r for r in runs if r.info.run_id in {b.info.run_id for b in before}]
    assert len(new) == 2 and len(old) == 2
    assert all(r.info.run_name.endswith("(superseded)") and r.data.tags["anonrisk.superseded_by"] for r in old)
    child = next(r for r in new if "mlflow.parentRunId" in r.data.tags)
    assert child.data.tags["anonrisk.reused_stages"].startswith("anonymize,train:contrastive")
    edge = again["results"]["blur"]["attacks"]["edge"]["protocols"]["full-ref/exclude-source"]["top1"]
    assert child.data.metrics["edge/top1_lo"] == pytest.approx(edge["ci95"][0])
    # a reused training still gives the new child its whole curve
    client = mlflow_runs(tmp)[0]
    assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 8
    # tracking.log_images: the samples grid in the child run, anonymized images only (half the width of the
    # results/ grid, which shows the synthetic originals beside them)
    from PIL import Image

    logged = Image.open(client.download_artifacts(child.info.run_id, "samples/samples_blur.png", str(tmp)))
    shown = Image.open(Path(again["results_dir"]) / "plots" / "samples_blur.png")
    assert logged.size[0] < 0.7 * shown.size[0] and abs(logged.size[1] - shown.size[1]) <= 4


@pytest.mark.slow  # the tiny run: about 30 s on 2 quiet cores, shared by the three
def test_samples_grid_shows_originals_only_for_synthetic_data_or_on_request(tiny_run, tmp_path):
    from PIL import Image

    from anonrisk.plan import plan
    from anonrisk.report.report import write_samples

    tmp, doc, _ = tiny_run
    shipped = Path(doc["results_dir"]) / "plots" / "samples_blur.png"
    assert shipped.stat().st_size > 1000 and "samples_blur.png" in (Path(doc["results_dir"]) / "report.md").read_text()
    cfg = tiny_cfg(tmp)
    p = plan(cfg)
    target = p.targets["blur"]
    width = {}
    for label, c, originals in [("synthetic", cfg, None), ("real", SimpleNamespace(data=SimpleNamespace(dataset="lfw"), tracking=cfg.tracking), None),
                                ("real, asked", SimpleNamespace(data=SimpleNamespace(dataset="lfw"), tracking=cfg.tracking), True)]:
        assert write_samples(c, p.prepare, "blur", target.anonymize, tmp_path / f"{label}.png", originals)
        width[label] = Image.open(tmp_path / f"{label}.png").size[0]
    assert width["real"] < width["synthetic"] == width["real, asked"]  # anonymized only, unless asked
    assert Image.open(shipped).size[0] == width["synthetic"]


def test_step_logger_one_point_per_step_and_never_stops_training(tmp_path, caplog):
    from mlflow import MlflowClient

    from anonrisk.tracking.steps import StepLogger

    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    run = client.create_run(client.create_experiment("e"))
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "lr": 0.1}) + "\n" for s in range(6)) + '{"step": 6, "lo')
    first = StepLogger(client, run.info.run_id, interval_s=0.05)
    for s in (2, 3, 3):  # live steps (one twice: a retried call)
        first(s, 1.0 / (s + 1), 0.1)
    time.sleep(0.3)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [2, 3]  # sent while it runs
    first.close(log)  # the steps this run never saw (trained before it opened) from the log, a torn line left out
    again = StepLogger(client, run.info.run_id)  # a requeued job on the same run
    again(4, 0.2, 0.1)
    again.close(log)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(6))
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 6

    caplog.set_level(logging.WARNING, "anonrisk")
    gone = StepLogger(SimpleNamespace(get_metric_history=lambda *a: [], log_batch=_refuse), "r", interval_s=0.01)  # server gone
    t = time.perf_counter()
    for s in range(200):
        gone(s, 1.0, 0.1)
    assert time.perf_counter() - t < 0.5  # the loop only appends
    gone.close()
    assert len([r for r in caplog.records if "live training metrics paused" in r.message]) == 1


def _refuse(*args, **kwargs):
    raise ConnectionError("connection refused")


@pytest.mark.slow  # shares the tiny run
def test_ls_names_each_stage(tiny_run, capsys):
    from anonrisk.cli import main

    tmp, _, _ = tiny_run
    assert main(["ls", "--runs-dir", str(tmp / "runs"), "--results-dir", str(tmp / "results")]) == 0
    rows = {line.split()[-1]: line for line in capsys.readouterr().out.splitlines()[1:] if not line.startswith("results")}
    by_stage = {path.split("/")[0]: [line for p, line in rows.items() if p.startswith(path.split("/")[0])] for path in rows}
    assert "dataset=synthetic" in by_stage["prepare"][0] and all("anonymizer=blur" in line for line in by_stage["anonymize"])
    assert "anonymizer=blur attack=contrastive backbone=test_resnet" in by_stage["train"][0]
    assert {"attack=contrastive", "attack=edge"} == {w for line in by_stage["evaluate"] for w in line.split() if w.startswith("attack=")}
    assert all(" done " in line and " ago " in line and ("KB" in line or "MB" in line) for line in rows.values())


def test_ls_hints_when_empty_and_lists_kinds_with_params(tmp_path, capsys):
    from anonrisk.cli import main

    assert main(["ls", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]) == 0
    assert "no stages under" in capsys.readouterr().out
    assert main(["ls", "kinds"]) == 0
    out = capsys.readouterr().out
    assert "  blur " in out and "sigma=0.06" in out and "  contrastive " in out and "edges='canny'" in out
    assert "  synthetic " in out and "identities=150" in out and "controlnet-canny-tiny" in out and "kind=diffusion" in out


@pytest.mark.slow  # an mlflow server (about 8 s) and headless Chromium on the tiny run
def test_mlflow_ui_in_a_real_browser_shows_the_child_run_and_its_curve(tiny_run, tmp_path):
    import shutil
    import socket
    import subprocess
    import urllib.request

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) drives the browser")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("headless Chromium absent: apt-get install -y chromium chromium-driver")
    tmp, _, _ = tiny_run
    state = json.loads((Path(tiny_run[1]["results_dir"]) / "mlflow.json").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", state["tracking_uri"],
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,900"):
            opts.add_argument(a)
        from selenium.webdriver.chrome.service import Service

        browser = webdriver.Chrome(service=Service(driver), options=opts)
        try:
            child = state["children"]["blur"]["run_id"]
            page = f"{base}/#/experiments/{state['experiment_id']}/runs/{child}"
            text = _page_text(browser, page, "Parent run")
            assert "tiny/blur" in text and "Finished" in text and "anonrisk.anonymizer" in text
            text = _page_text(browser, page + "/model-metrics", "train")
            assert all(s in text for s in ("worst", "leakage", "utility", "train")), text[:2000]  # the metric sections
            browser.save_screenshot(str(tmp_path / "child.png"))
            assert (tmp_path / "child.png").stat().st_size > 10_000
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(timeout=30)


def _page_text(browser, url: str, wait_for: str, timeout: float = 60) -> str:
    browser.get(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = browser.find_element("tag name", "body").text
        if wait_for in text:
            return text
        time.sleep(0.5)
    return browser.find_element("tag name", "body").text

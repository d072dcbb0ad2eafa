import signal, time
from tests.e2e.test_faults import *  # noqa
from tests.e2e.test_faults import deploy, SPAN, QUICK


def test_probe_group_sigterm(tmp_path, processes, pg_database, private_redis, model_file):
    service = deploy(processes, tmp_path / "home", pg_database, private_redis.url)
    worker = service.start_worker("worker", SPAN)
    model_id = service.upload(model_file)
    running = service.submit(model_id)["id"]
    service.wait_measuring(running)
    os.killpg(worker.pid, signal.SIGTERM)
    t = time.monotonic()
    rc = worker.wait(timeout=90)
    print("\nrc", rc, "after", time.monotonic() - t, service.job(running)["status"], service.job(running)["attempts"])
    service.start_worker("next", QUICK)
    job = service.wait_finished(running)
    print("final", job["status"], job["attempts"], time.monotonic() - t)

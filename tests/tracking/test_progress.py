import time


from llmstack.tracking.progress import Progress


def err_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


def test_plain_status_lines_when_stderr_is_not_a_terminal(capsys):
    progress = Progress(total_steps=10, initial_step=0, is_main=True, desc="train", plain_every=5)
    for step in range(1, 11):
        progress.update(step, loss=1.0 / step, tokens_per_s=5240.0, mfu=0.031)
    progress.close()
    lines = err_lines(capsys)
    assert len(lines) == 2
    assert lines[0].startswith("[train] step 5/10 (50%) loss 0.2 tok/s 5.2k mfu 3.1% eta 0m")
    assert lines[1].startswith("[train] step 10/10 (100%) loss 0.1 tok/s 5.2k mfu 3.1% eta 0m00s")


def test_status_printed_on_crossing_a_threshold_and_values_persist(capsys):
    progress = Progress(total_steps=10, initial_step=0, is_main=True, desc="ppo", plain_every=5)
    progress.update(3, reward=0.5, tokens_per_s=800.0)
    progress.update(6, reward=0.25)
    progress.update(9, reward=0.75)
    progress.update(10, kl=0.01)
    lines = err_lines(capsys)
    assert [line.split(" eta ")[0] for line in lines] == [
        "[ppo] step 6/10 (60%) reward 0.25 tok/s 800",
        "[ppo] step 10/10 (100%) reward 0.75 tok/s 800 kl 0.01"]


def test_eta_counts_only_steps_done_in_this_process(capsys):
    progress = Progress(total_steps=100, initial_step=50, is_main=True, desc="train", plain_every=10)
    progress.started = time.perf_counter() - 10.0  # 10 s for the 10 steps since resuming at 50
    progress.update(60)
    assert err_lines(capsys) == ["[train] step 60/100 (60%) eta 0m40s"]
    assert Progress(100, 50, True, "x").eta(50) is None


def test_other_processes_print_nothing(capsys):
    progress = Progress(total_steps=4, initial_step=0, is_main=False, desc="train", plain_every=1)
    for step in range(1, 5):
        progress.update(step, loss=1.0)
    progress.close()
    assert capsys.readouterr().err == ""


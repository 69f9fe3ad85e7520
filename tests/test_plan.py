"""`namm evolve --plan`: the memory a run needs per actor and the time per generation, on GPUs
described or read from (fake) cluster resources, before anything starts."""
import pytest

from orchestrator.config import ConfigError, config_from_dict, load_config
from orchestrator.plan import GIB, GPUs, plan_for

PAPER_RUN = "jobs/evolve.yaml"   # Llama-3-8B at 32k tokens (NTK-scaled), bf16


def paper_run(**namm):
    cfg = load_config(PAPER_RUN, check_files=False)
    for key, value in namm.items():
        setattr(cfg.namm, key, value)
    return cfg


@pytest.mark.parametrize("text,count,gib", [("8xA100-80GB", 8, 80), ("1xL4", 1, 24), ("4 x H100", 4, 80),
                                            ("2xA100-40GB", 2, 40), ("1xMI300-192GB", 1, 192)])
def test_gpus_are_read_as_written(text, count, gib):
    gpus = GPUs.parse(text)
    assert gpus.count == count and gpus.memory_bytes == gib * GIB


@pytest.mark.parametrize("text", ["A100", "0xL4", "8xWARP9", "eight A100s"])
def test_gpus_that_cannot_be_read_are_refused(text):
    with pytest.raises(ConfigError, match="--plan-gpus"):
        GPUs.parse(text)


def test_the_paper_run_fits_an_a100_80gb_and_its_numbers_follow_from_the_architecture():
    plan = plan_for(paper_run(), "8xA100-80GB")
    lines = dict(plan.lines)
    assert plan.fits and lines["fits"] == "yes" and lines["actors"] == "8"
    assert lines["model"].startswith("meta-llama/Meta-Llama-3-8B: 8.03B parameters, 32 layers, 8 KV heads x 128")
    # K and V x 32 layers x 8 KV heads x 128 dims x 32,768 tokens x 2 bytes
    assert lines["KV cache, full"] == f"{2 * 32 * 8 * 128 * 32768 * 2 / GIB:.2f} GiB" == "4.00 GiB"
    # 32 query heads x a 512-token chunk x 32,768 keys x (2 + 4 + 2) bytes
    assert lines["attention of a chunk"].startswith("4.00 GiB")
    assert plan.seconds_per_generation > 0


def test_the_paper_run_at_32k_is_refused_on_a_24gb_gpu_with_the_numbers(capsys):
    from namm_cli.cli import main

    assert main(["evolve", PAPER_RUN, "--plan", "--plan-gpus", "1xL4"]) == 2
    captured = capsys.readouterr()
    assert "fits                       NO: an actor needs 24.70 GiB, a GPU gives it 22.80 GiB" in captured.out
    assert "does not fit" in captured.err


def test_a_budget_bounds_the_namms_cache_but_not_the_full_cache_references():
    lines = dict(plan_for(paper_run(selection="top_k", budget="0.25"), "8xA100-80GB").lines)
    # a quarter of 32,768 tokens + the 512 read between two updates
    per_token = 2 * 32 * 8 * 128 * 2
    assert lines["KV cache, with the NAMM"].startswith(f"{(8192 + 512) * per_token / GIB:.2f} GiB")
    assert lines["per actor, at most"] == dict(plan_for(paper_run(), "8xA100-80GB").lines)["per actor, at most"]


def test_a_cluster_is_planned_from_its_resources():
    plan = plan_for(paper_run(), cluster_resources={"CPU": 64, "GPU": 4, "accelerator_type:A100-80G": 1})
    assert plan.fits and dict(plan.lines)["GPUs"].startswith("4 x A100-80G")
    assert not plan_for(paper_run(), cluster_resources={"GPU": 2, "accelerator_type:L4": 1}).fits
    with pytest.raises(ConfigError, match="--plan-gpus"):
        plan_for(paper_run(), cluster_resources={"GPU": 2, "accelerator_type:B9000": 1})


def test_fractional_gpus_pack_actors_and_split_the_memory(tmp_path):
    cfg = config_from_dict({
        "name": "half", "model": {"name": "smollm2", "dtype": "bfloat16"},
        "workers": {"num_actors": 4, "gpus_per_actor": 0.5},
        "stages": [{"name": "s", "generations": 1, "tasks": [{"task": "passkey", "context_length": 2048}]}],
    }, base_dir=tmp_path)
    lines = dict(plan_for(cfg, "2xL4", seconds_per_token=0.001).lines)
    assert lines["actors per GPU"] == "2" and lines["actors"] == "4"
    assert "given" in lines["seconds per token"]


def test_a_plan_for_this_machine_measures_the_model(capsys):
    from namm_cli.cli import main

    assert main(["evolve", "jobs/smoke.yaml", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "measured here" in out and "seconds per generation" in out and "GPUs" not in out


def test_the_cluster_config_can_run_the_paper_run():
    """ray_cluster.yaml and jobs/evolve.yaml agree: enough GPU workers with enough CPUs for the
    actors, a GPU the plan says the run fits, the evolution extras installed, the same run root
    and MLflow server as the job's runtime environment."""
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    cluster = yaml.safe_load((root / "ray_cluster.yaml").read_text())
    runtime = yaml.safe_load((root / "jobs" / "runtime_env.yaml").read_text())
    cfg = paper_run()
    gpu_nodes = [n for n in cluster["available_node_types"].values() if n["resources"].get("GPU", 0) > 0]
    assert len(gpu_nodes) == 1
    node = gpu_nodes[0]
    actors_per_node = int(node["resources"]["GPU"] // cfg.workers.gpus_per_actor)
    assert node["min_workers"] * actors_per_node >= cfg.workers.num_actors
    assert node["resources"]["CPU"] >= actors_per_node * cfg.workers.cpus_per_actor
    gpu_of_instance = {"g6e.2xlarge": "1xL40S", "g5.2xlarge": "1xA10G", "g6.2xlarge": "1xL4"}
    gpu = gpu_of_instance[node["node_config"]["InstanceType"]]
    assert plan_for(cfg, f"{node['min_workers']}x{gpu.split('x')[1]}").fits, f"the run does not fit a {gpu}"
    assert any('pip install -e ".[all]"' in c for c in cluster["setup_commands"])
    assert runtime["env_vars"]["NAMM_RUN_ROOT"] == cfg.checkpoint.root
    port = runtime["env_vars"]["MLFLOW_TRACKING_URI"].rsplit(":", 1)[1]
    assert any(f"mlflow server --host 127.0.0.1 --port {port}" in c for c in cluster["head_setup_commands"])

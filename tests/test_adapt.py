"""`namm adapt`: a NAMM's normalisation statistics collected again on a model, as evolution collects them."""
from pathlib import Path

import numpy as np
import torch
import yaml

from namm_cli.cli import main as namm_main
from namm_core import NAMM
from orchestrator.config import config_from_dict
from orchestrator.driver import EvolutionRun

ROOT = Path(__file__).resolve().parent.parent


def test_adapting_on_the_run_s_own_model_and_prompts_gives_back_the_run_s_statistics(tmp_path, capsys):
    data = yaml.safe_load((ROOT / "jobs" / "smoke.yaml").read_text())
    data.update(name="adapt", checkpoint={"root": str(tmp_path / "runs"), "keep": 3},
                tracking={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"})
    data["stages"] = data["stages"][:1]
    data["workers"]["pool"] = "in_process"
    summary = EvolutionRun(config_from_dict(data, base_dir=tmp_path)).run()
    evolved = Path(summary["run_dir"]) / "artifacts" / "namm_latest"
    namm = NAMM.from_pretrained(evolved)
    assert namm.norm_count > 0

    # smoke.yaml: the embedded tiny random Llama ("tiny-random"), 2 fidelity prompts of 256 tokens, seed 0;
    # the run collected them on two actors and merged the moments
    out = tmp_path / "adapted"
    assert namm_main(["adapt", str(evolved), str(out), "--model", "tiny-random", "--tasks", "fidelity",
                      "--num-prompts", "2", "--context-length", "256", "--seed", "0"]) == 0
    adapted = NAMM.from_pretrained(out)
    assert torch.equal(adapted.get_params(), namm.get_params())
    assert adapted.config == namm.config
    assert adapted.norm_count == namm.norm_count
    np.testing.assert_allclose(adapted.norm_mean.numpy(), namm.norm_mean.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(adapted.norm_var.numpy(), namm.norm_var.numpy(), rtol=1e-4, atol=1e-7)
    assert adapted.metadata["statistics"]["model"] == "tiny-random"
    assert adapted.metadata["run"] == "adapt"          # what the NAMM said of itself is kept

    # the levers table names how such a NAMM was made
    import sys

    sys.path.insert(0, str(ROOT))
    from bench import evolution_levers

    facts = evolution_levers.adapted_facts(str(out))
    assert facts["config"] == f"`namm adapt {evolved} --model tiny-random`" and facts["candidates"] == 0
    assert evolution_levers.adapted_facts(str(evolved)) is None

    # other prompts: other statistics, the same scorer
    other = tmp_path / "other"
    assert namm_main(["adapt", str(evolved), str(other), "--model", "tiny-random", "--tasks", "passkey",
                      "--num-prompts", "1", "--context-length", "256"]) == 0
    moved = NAMM.from_pretrained(other)
    assert not torch.allclose(moved.norm_mean, namm.norm_mean) and torch.equal(moved.get_params(), namm.get_params())
    assert "feature std" in capsys.readouterr().out


def test_adapt_refuses_to_overwrite_its_source_and_names_a_bad_directory(tmp_path, capsys):
    assert namm_main(["adapt", str(tmp_path / "nope"), str(tmp_path / "out"), "--model", "tiny-random"]) == 2
    assert "not a NAMM directory" in capsys.readouterr().err
    NAMM().save_pretrained(tmp_path / "z")
    assert namm_main(["adapt", str(tmp_path / "z"), str(tmp_path / "z"), "--model", "tiny-random"]) == 2
    assert "another directory" in capsys.readouterr().err

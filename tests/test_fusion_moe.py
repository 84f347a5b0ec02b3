"""MoE-LLaVA's sparse experts: the Mixtral-block and load-balancing oracles, upcycling, MoE-tuning stages."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoTokenizer, MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from conftest import build_with_llm as build, image_batch, waken
from mmbridge.config import RunConfig, load_run_config
from mmbridge.model.bridges import FusionCall
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.testing import tiny_model_config, write_shape_dataset
from mmbridge.train import StageConfig, apply_stage, train

MOE = {"type": "moe", "every": 1, "num_experts": 4, "top_k": 2}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixtral_block_like(moe, hidden: int, intermediate: int) -> MixtralSparseMoeBlock:
    """transformers' Mixtral MoE block holding our router and experts (gate/up fused as Mixtral stores them)."""
    config = MixtralConfig(hidden_size=hidden, intermediate_size=intermediate, num_local_experts=len(moe.experts),
                           num_experts_per_tok=moe.top_k, hidden_act="silu", router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        for index, expert in enumerate(moe.experts):
            block.experts.gate_up_proj[index].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            block.experts.down_proj[index].copy_(expert.down_proj.weight)
    return block


def test_one_moe_layer_reproduces_transformers_mixtral_block(tokenizer_dir):
    model = build(tokenizer_dir, MOE)
    waken(model, scale=0.5)  # experts differ, the router has a preference
    moe = model.bridge.moe_layers["0"]
    block = mixtral_block_like(moe, hidden=32, intermediate=64)
    hidden = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, theirs = moe(hidden), block(hidden)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (theirs - model.bridge.dense_ffns["0"](hidden)).abs().max() > 1e-2  # the experts do differ


def test_load_balancing_loss_matches_transformers(tokenizer_dir):
    model = build(tokenizer_dir, MOE)
    waken(model, scale=0.5)
    batch = image_batch(model, left_pad=2)
    model.train()
    call = FusionCall(batch["input_ids"] == model.image_token_id, batch["attention_mask"], training=True)
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    model.llm(embeds, attention_mask=batch["attention_mask"], context=call)
    logits = tuple(layer_logits for layer_logits, _ in model.bridge.routing[1])  # kept until training_outputs
    losses, stats = model.bridge.training_outputs(call)
    assert model.bridge.routing is None  # read once
    expected = load_balancing_loss_func(logits, 4, 2, batch["attention_mask"])
    torch.testing.assert_close(losses["moe_aux_loss"], 0.01 * expected, rtol=1e-6, atol=0)
    attended = int(batch["attention_mask"].sum())
    assert [sum(layer) for layer in stats["moe_tokens_per_expert"]] == [2 * attended] * 2


def test_loss_adds_the_weighted_balance_term(tokenizer_dir):
    model = build(tokenizer_dir, {**MOE, "aux_loss_weight": 0.5})
    batch = image_batch(model)
    with torch.no_grad():
        output = model(**batch)
        plain = model.target_loss(*_hidden_and_targets(model, batch))[0]
    assert output.loss == pytest.approx(float(plain + output.aux_losses["moe_aux_loss"]), rel=1e-6)
    assert float(output.aux_losses["moe_aux_loss"]) > 0


def _hidden_and_targets(model, batch):
    call = FusionCall(batch["input_ids"] == model.image_token_id, batch["attention_mask"])
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    hidden, _ = model.llm(embeds, attention_mask=batch["attention_mask"], context=call)
    return hidden[:, :-1], batch["labels"][:, 1:]


def test_dense_start_runs_the_llm_ffn_until_upcycled_then_routes_copies_of_it(tokenizer_dir, tmp_path):
    base = build(tokenizer_dir, {"type": "mlp"})
    model = build(tokenizer_dir, {**MOE, "start": "dense"})
    waken(model)  # the waiting experts are not used
    ids = torch.randint(5, 200, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, rtol=0, atol=1e-6)
        ffn = model.bridge.dense_ffns["1"]
        ffn.up_proj.weight.mul_(1.5)  # as stage II's training would change it
        dense = model(ids).logits
    assert model.bridge.export_config().start == "dense"
    model.bridge.upcycle()
    assert model.bridge.active and model.bridge.export_config().start == "moe"
    for expert in model.bridge.moe_layers["1"].experts:
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(expert.state_dict().values(),
                                                                    ffn.state_dict().values()))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, rtol=0, atol=1e-5)  # equal copies: same function
    model.save_pretrained(str(tmp_path))
    assert MultimodalModel.from_pretrained(str(tmp_path)).bridge.active  # saved as routing


def test_moe_llava_recipe_stages_train_what_the_paper_says(tokenizer_dir):
    run = load_run_config(os.path.join(ROOT, "configs", "moe_llava.yaml"))
    model = build(tokenizer_dir, {**run.model["bridge"], "every": 1})
    stages = [StageConfig(**{k: v for k, v in stage.items() if k != "data"}) for stage in run.stages]
    assert [stage.upcycle for stage in stages] == [False, False, True]

    def trainable() -> set[str]:
        return {name.split(".")[0] + "." + name.split(".")[1] for name, p in model.named_parameters()
                if p.requires_grad}

    apply_stage(model, stages[0], log=False)
    assert trainable() == {"bridge.projector"}
    apply_stage(model, stages[1], log=False)
    assert trainable() == {"bridge.projector", "llm.model"}
    apply_stage(model, stages[2], log=False)
    assert trainable() == {"bridge.moe_layers"}


def test_stage_errors_name_the_problem(tokenizer_dir, tmp_path):
    model = build(tokenizer_dir, MOE)
    with pytest.raises(ValueError, match=r"'only' names 'experts', which holds no parameter; parts: \['moe_layers', "
                                         r"'projector'\]"):
        apply_stage(model, StageConfig(name="s", train={"bridge": {"mode": "full", "only": ["experts"]}}), log=False)
    with pytest.raises(ValueError, match="'only' narrows mode 'full'"):
        StageConfig(name="s", train={"bridge": {"mode": "lora", "only": ["projector"]}})
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    run = RunConfig(model=tiny_model_config(tokenizer_dir, vocab), output_dir=str(tmp_path),
                    stages=[{"name": "s", "upcycle": True, "steps": 1}],
                    data={"sources": [{"path": write_shape_dataset(str(tmp_path / "d"), 2)}]})
    with pytest.raises(ValueError, match="stage 's' sets upcycle.*use bridge type 'moe'"):
        train(run, progress=False)


@pytest.mark.parametrize("spec, message", [
    ({"type": "moe", "top_k": 5}, "1 <= top_k <= num_experts"),
    ({"type": "moe", "start": "sparse"}, "start must be one of"),
    ({"type": "moe", "every": 0}, "'every' must be >= 1"),
])
def test_bad_specs_name_what_is_wrong(tokenizer_dir, spec, message):
    with pytest.raises(ValueError, match=message):
        build(tokenizer_dir, spec)


class _Kill(Exception):
    pass


@pytest.mark.parametrize("kill_at", [4, 5], ids=["after-stage-II", "inside-stage-III"])
def test_three_stage_moe_tuning_trains_and_resumes(tokenizer_dir, tmp_path, kill_at):
    """Stage II changes the LLM, stage III copies its FFNs into experts and changes only the MoE layers; a run
    killed at the stage boundary or inside stage III and resumed ends exactly where the uninterrupted one does."""
    data = write_shape_dataset(str(tmp_path / "shapes"), 8, seed=1)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1
    common = {"lr": 1e-2, "steps": 2, "batch_size": 4, "precision": "fp32", "save_every": 1}
    stages = [{"name": "align", "train": {"bridge": {"mode": "full", "only": ["projector"]}}, **common},
              {"name": "all", "train": {"bridge": {"mode": "full", "only": ["projector"]}, "llm": "full"}, **common},
              {"name": "moe", "upcycle": True, "train": {"bridge": {"mode": "full", "only": ["moe_layers"]}},
               **common}]
    bridge = {**MOE, "start": "dense"}

    def run_config(output: str) -> RunConfig:
        return RunConfig(model=tiny_model_config(tokenizer_dir, vocab, bridge=bridge), stages=stages,
                         output_dir=output, data={"sources": [{"path": data}], "max_length": 128})

    after_stage_two = {}

    def snapshot(record: dict) -> None:
        if record["global_step"] == 4:
            after_stage_two.update({k: v.clone() for k, v in whole_model.llm.state_dict().items()})

    torch.manual_seed(0)
    whole_model = MultimodalModel.from_config(run_config("unused").model)
    whole = train(run_config(str(tmp_path / "whole")), model=whole_model, progress=False, on_step=snapshot).model
    assert whole.bridge.active
    with open(tmp_path / "whole" / "log.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert ["aux_losses" in record for record in records] == [False] * 4 + [True] * 2
    for name, tensor in whole.llm.state_dict().items():  # stage III leaves the LLM as stage II left it
        assert torch.equal(tensor, after_stage_two[name]), name

    def kill(record: dict) -> None:
        if record["global_step"] == kill_at:
            raise _Kill()

    torch.manual_seed(0)
    with pytest.raises(_Kill):
        train(run_config(str(tmp_path / "part")), progress=False, on_step=kill)
    resumed = train(run_config(str(tmp_path / "part")), resume=True, progress=False).model
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name

"""Projected networks (SLM-pn): ProjectedMLP in the model, instantiate() in closed form, [model.projected] in
the project file, and `nichelm specialize` writing a plain run that train.init_from and export take."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nichelm.config import load_project, model_config
from nichelm.errors import UserError
from nichelm.model import GPT, ModelConfig, Projection, instantiate
from tests.conftest import run_cli, tiny_project

K = 3                                           # clusters (experts) of the test networks


def projected_model(arch: str, seed: int = 0, **shape) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=64,
                      n_kv_head=2 if arch == "llama" else None, projected=Projection(K, 4, 5), **shape)
    model = GPT(cfg).eval()
    with torch.no_grad():                       # biases start at 0: make them count in the checks
        for block in model.blocks:
            for name, basis in block.mlp.basis.items():
                if name.endswith("bias"):
                    basis.normal_(0, 0.02)
    return model


def tokens(batch=3, length=20, seed=1):
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_instantiated_expert_gives_the_projected_networks_logits(arch):
    """Issue 14's exactness: the plain model instantiated for cluster i gives the logits of the full network run
    with expert i, within 1e-5; another cluster's expert does not (so the check can tell experts apart)."""
    model, x = projected_model(arch), tokens()
    for i in range(K):
        plain = instantiate(model, cluster=i).eval()
        assert plain.cfg == model.cfg.base() and plain.experts is None
        assert type(plain.blocks[0].mlp).__name__ == "MLP"
        full = model(x, cluster=i)[0]
        assert torch.allclose(plain(x)[0], full, atol=1e-5, rtol=0)
        other = model(x, cluster=(i + 1) % K)[0]
        assert (plain(x)[0] - other).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_closed_form_is_the_papers_formula(arch):
    """Each instantiated MLP weight is W = sum_q E[i,q] sum_r M[q,r] T[r], computed here term by term."""
    model = projected_model(arch)
    E = model.experts.detach()
    plain = instantiate(model, cluster=2)
    for layer, block in enumerate(model.blocks):
        M = block.mlp.mix.detach()
        for name in block.mlp.names:                                   # "down.weight", ...
            T = block.mlp.basis[name.replace(".", "_")].detach()
            want = sum(E[2, q] * sum(M[q, r] * T[r] for r in range(M.shape[1])) for q in range(M.shape[0]))
            got = plain.state_dict()[f"blocks.{layer}.mlp.{name}"]
            assert torch.allclose(got, want, atol=1e-6), (layer, name)
    # everything else is the network's own: embeddings, attention, norms, head
    shared = {k: v for k, v in model.state_dict().items() if ".mlp." not in k and k != "experts"}
    for key, value in shared.items():
        assert torch.equal(plain.state_dict()[key], value), key


def test_a_mixture_is_the_weighted_sum_of_its_experts():
    """instantiate(mixture=w): the code sum_i w_i E[i] (w normalised), so every MLP weight is sum_i w_i W_i (the
    formula is linear in E), and the logits are those of the network run with that code as an expert."""
    model, x = projected_model("llama"), tokens()
    w = torch.tensor([2.0, 0.0, 6.0])                                    # normalised: 0.25, 0, 0.75
    mixed = instantiate(model, mixture=w.tolist()).state_dict()
    experts = [instantiate(model, cluster=i).state_dict() for i in range(K)]
    for key, value in mixed.items():
        if ".mlp." in key:
            assert torch.allclose(value, 0.25 * experts[0][key] + 0.75 * experts[2][key], atol=1e-6), key
    with torch.no_grad():                                               # the mixture's code as expert 1
        model.experts[1] = 0.25 * model.experts[0] + 0.75 * model.experts[2]
    assert torch.allclose(instantiate(model, mixture=w.tolist()).eval()(x)[0], model(x, cluster=1)[0], atol=1e-5)
    with pytest.raises(ValueError, match="3 finite weights"):
        instantiate(model, mixture=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="one of cluster= and mixture="):
        instantiate(model)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rows_of_several_clusters_each_use_their_own_expert(arch):
    """forward(cluster=(B,)): each row's logits are those of that row run alone with its cluster."""
    model, x = projected_model(arch), tokens(batch=4)
    clusters = torch.tensor([2, 0, 2, 1])
    logits = model(x, cluster=clusters)[0]
    for row, c in enumerate(clusters.tolist()):
        assert torch.allclose(logits[row], model(x[row:row + 1], cluster=c)[0][0], atol=1e-5)
    assert torch.equal(model(x, cluster=torch.tensor([1] * 4))[0], model(x, cluster=1)[0])


def test_a_step_on_one_cluster_trains_its_expert_and_the_shared_weights_only():
    model, x = projected_model("gpt2"), tokens()
    model.train()
    _, loss = model(x[:, :-1], x[:, 1:], cluster=1)
    loss.backward()
    grad = model.experts.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "experts")


def test_projected_and_plain_models_refuse_the_wrong_call():
    model, x = projected_model("llama"), tokens()
    with pytest.raises(ValueError, match="give forward"):
        model(x)
    with pytest.raises(ValueError, match="clusters 0..2"):
        model(x, cluster=3)
    with pytest.raises(ValueError, match="2 clusters for 3 rows"):
        model(x, cluster=torch.tensor([0, 1]))
    plain = instantiate(model, cluster=0)
    with pytest.raises(ValueError, match="this model is plain"):
        plain(x, cluster=0)
    with pytest.raises(ValueError, match="this model is plain"):
        instantiate(plain, cluster=0)


def test_plain_configs_are_written_as_before_and_projected_ones_read_back():
    plain = ModelConfig(arch="gpt2")
    assert "projected" not in plain.to_dict()                          # checkpoints and exports unchanged
    cfg = ModelConfig(projected=Projection(8, 4, 16))
    back = ModelConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.projected == Projection(8, 4, 16) and back.base() == ModelConfig()


# ---------------------------------------------------------------- the project file

def test_model_projected_in_the_project_file(tiny_project):
    p = load_project(tiny_project, ["model.projected.clusters=4", "model.projected.m=2", "model.projected.h=3"])
    assert model_config(p, 320).projected == Projection(4, 2, 3)
    assert model_config(load_project(tiny_project), 320).projected is None
    for sets, message in ((["model.projected.clusters=4"], r"clusters = 4 needs m and h of 1 or more"),
                          (["model.projected.m=2"], r"sets m or h but not clusters"),
                          (["model.projected.clusters=-1"], r"'model.projected.clusters' is -1"),
                          (["model.projected.k=3"], r"unknown key 'model.projected.k'")):
        with pytest.raises(UserError, match=message):
            load_project(tiny_project, sets)


# ---------------------------------------------------------------- nichelm specialize

@pytest.fixture(scope="module")
def projected_run(tmp_path_factory):
    """The tiny project prepared, and in a copy of its run a projected network's checkpoint at step 5 (written
    directly: what train writes for a projected model), with a cluster selection.json of K clusters."""
    from nichelm.checkpoint import save_checkpoint
    from nichelm.data.tokenizer import load_tokenizer
    from nichelm.prepare import prepare
    from nichelm.train import Optimizers
    folder = tmp_path_factory.mktemp("specialize")
    project_file = getattr(tiny_project, "__wrapped__", tiny_project)(folder)
    prepared = folder / "prepared"
    prepare(load_project(project_file, [f"run_dir={prepared}"]))
    run = folder / "pn"
    shutil.copytree(prepared, run)
    sets = [f"run_dir={run}", f"model.projected.clusters={K}", "model.projected.m=4", "model.projected.h=5"]
    project = load_project(project_file, sets)
    torch.manual_seed(3)
    model = GPT(model_config(project, load_tokenizer(prepared / "tokenizer" / "tokenizer.json").get_vocab_size()))
    save_checkpoint(run, 5, model, Optimizers([]), {"step": 5, "elapsed_s": 1.0, "tokens": 100,
                                                    "model_config": model.cfg.to_dict()}, keep=0)
    (run / "select").mkdir()
    (run / "select" / "selection.json").write_text(json.dumps({"method": "clusters", "clusters": [
        {"cluster": c, "target_share": s, "generic_share": 1 / K} for c, s in enumerate([0.5, 0.0, 0.5])]}))
    return {"file": project_file, "sets": sets, "run": run, "model": model, "prepared": prepared}


def _logits(model, x, **kw):
    with torch.no_grad():
        return model.eval()(x, **kw)[0]


def test_specialize_writes_a_plain_run_that_init_from_and_export_take(projected_run, tmp_path):
    """`nichelm specialize --cluster 1`: a plain run whose model gives expert 1's logits; train.init_from starts
    a fine-tuning run from exactly those weights; `nichelm export` exports it."""
    from nichelm.artifacts import open_run
    from nichelm.export import export
    from nichelm.train import train
    r = run_cli("specialize", projected_run["file"], *sum((["--set", s] for s in projected_run["sets"]), []),
                "--cluster", "1")
    assert r.returncode == 0, r.stderr
    out = projected_run["run"] / "specialized" / "cluster_1"
    assert r.stdout.strip() == str(out)
    source = open_run(out)
    assert source.cfg.projected is None and source.trainer["specialized"]["cluster"] == 1
    assert json.loads((out / "model_config.json").read_text()) == source.cfg.to_dict()
    x = torch.randint(0, source.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    plain = source.load_model()
    assert torch.allclose(_logits(plain, x), _logits(projected_run["model"], x, cluster=1), atol=1e-5)
    assert not torch.allclose(_logits(plain, x), _logits(projected_run["model"], x, cluster=0), atol=1e-3)

    torch.set_num_threads(1)
    tune = load_project(projected_run["file"], [f"run_dir={tmp_path / 'tune'}", f"train.init_from={out}",
                                                "train.max_steps=1", "train.lr=1e-30", "train.warmup_steps=0",
                                                "train.eval_every=0"])
    shutil.copytree(projected_run["prepared"], tune.run_path)
    train(tune)
    tuned = load_file(str(tune.run_path / "checkpoints" / "step_0000001" / "model.safetensors"))
    for key, value in plain.state_dict().items():
        if key in tuned:
            assert torch.equal(tuned[key], value), key
    hf = export(out, "hf")
    assert json.loads((hf / "nichelm.json").read_text())["model_config"] == source.cfg.to_dict()


def test_specialize_for_the_target_mixes_the_experts_by_its_histogram(projected_run, tmp_path):
    from nichelm.artifacts import open_run
    from nichelm.specialize import specialize
    project = load_project(projected_run["file"], projected_run["sets"])
    out = specialize(project, target=True, out=tmp_path / "target")
    assert open_run(out).trainer["specialized"]["mixture"] == [0.5, 0.0, 0.5]
    want = instantiate(projected_run["model"], mixture=[0.5, 0.0, 0.5]).state_dict()
    got = load_file(str(out / "checkpoints" / "step_0000000" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in got)
    again = specialize(project, mixture=[1, 0, 1], out=tmp_path / "target")          # replaces the folder whole
    assert load_file(str(again / "checkpoints" / "step_0000000" / "model.safetensors")).keys() == got.keys()
    assert not list(tmp_path.glob(".target*"))                                     # no staging folder left


def test_specialize_refuses_what_it_cannot_do(projected_run, tmp_path):
    from nichelm.specialize import specialize
    project = load_project(projected_run["file"], projected_run["sets"])
    with pytest.raises(UserError, match=r"--cluster 3: .* has clusters 0..2"):
        specialize(project, cluster=3)
    with pytest.raises(UserError, match=r"--mixture: 2 weights for 3 clusters"):
        specialize(project, mixture=[1, 1])
    with pytest.raises(UserError, match=r"one of --cluster I, --target and --mixture"):
        specialize(project, cluster=0, target=True)
    plain_run = specialize(project, cluster=0, out=tmp_path / "plain")             # a run of a plain model
    with pytest.raises(UserError, match=r"the model is plain"):
        specialize(load_project(projected_run["file"], [f"run_dir={plain_run}"]), cluster=0)
    bad = tmp_path / "run"
    shutil.copytree(projected_run["run"], bad, ignore=shutil.ignore_patterns("specialized"))
    (bad / "select" / "selection.json").write_text(json.dumps({"method": "dsir"}))
    with pytest.raises(UserError, match=r"no cluster histogram .*select.method = \"clusters\""):
        specialize(load_project(projected_run["file"], [*projected_run["sets"], f"run_dir={bad}"]), target=True)
    (bad / "select" / "selection.json").unlink()
    with pytest.raises(UserError, match=r"selection.json: missing"):
        specialize(load_project(projected_run["file"], [*projected_run["sets"], f"run_dir={bad}"]), target=True)
    r = run_cli("specialize", projected_run["file"], "--mixture", "1,x")
    assert r.returncode == 2 and "one number per cluster" in r.stderr


def test_mixed_batches_say_which_part_each_row_comes_from(projected_run):
    """The data path of joint training: one data part per cluster (part k = cluster k) in a phase's mix;
    parts_of() names each row's part, the expert it trains. Here part 1 is the val split: every row said to be
    of part 1 is a val row and no other row is, for every rank's slice of the step."""
    from nichelm.config import TaskConfig
    from nichelm.data.loader import MixedBatches, TaskBatches
    from nichelm.data.shards import load_split
    from nichelm.data.tokenizer import load_tokenizer, template_markers
    task = TaskConfig()
    shards = projected_run["prepared"] / "data" / "shards"
    tok = load_tokenizer(projected_run["prepared"] / "tokenizer" / "tokenizer.json")
    ids = [tok.token_to_id(m) for m in (*template_markers(task.prompt_template), task.end_marker)]

    def parts():
        return [TaskBatches(load_split(shards, name), 96, *ids, seed=5) for name in ("train", "val")]
    val = parts()[1]
    val_rows = {bytes(r[:-1]) for r in val.rows_at(np.arange(len(val))).astype(np.int64)}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        mixed = MixedBatches(parts(), [1.0, 1.0], seed=8, rank=rank, world_size=world)
        for step in (0, 2):
            for micro in (0, 1):
                x = mixed.get(step, micro, 2, 4 // world)[0].numpy()
                of = mixed.parts_of(step, micro, 2, 4 // world)
                assert len(of) == len(x) and set(of) <= {0, 1}
                assert [bytes(row) in val_rows for row in x] == [k == 1 for k in of]


def test_a_projected_network_trains_on_one_data_folder_per_cluster_and_resumes_bit_exact(projected_run, tmp_path,
                                                                                           monkeypatch):
    """Joint training (issue 14, SLM-pn): a phase mixes one data folder per cluster, each row runs its cluster's
    expert, and its val loss is the mean of every cluster's val split run with that cluster's expert; a run
    stopped and resumed ends with the same weights as a straight one; a projected run without per-cluster data
    is refused in one line, and so is exporting it before `nichelm specialize`."""
    import nichelm.train
    from nichelm.export import export
    from nichelm.specialize import specialize
    from nichelm.train import train
    validations, evaluate_loss = [], nichelm.train.evaluate_loss

    def recording(model, data, *args, cluster=None):
        validations.append((cluster, evaluate_loss(model, data, *args, cluster=cluster)))
        return validations[-1][1]
    monkeypatch.setattr(nichelm.train, "evaluate_loss", recording)
    prepared = projected_run["prepared"]
    other = tmp_path / "other"                            # cluster 1's data: another prepared folder
    (other / "data" / "shards").mkdir(parents=True)
    shutil.copytree(prepared / "tokenizer", other / "tokenizer")
    for split in ("train", "val"):
        shutil.copy(prepared / "data" / "shards" / "val_000000.bin", other / "data" / "shards" / f"{split}_000000.bin")
    text = projected_run["file"].read_text() + f'''
[[train.phases]]
name = "pretrain"
data = ["", "{other}"]
weights = [0.5, 0.5]
steps = 6
'''
    pn = projected_run["file"].with_name("pn_train.toml")          # beside it: its sources are relative paths
    pn.write_text(text)

    def project(run: str):
        if not (tmp_path / run).exists():
            shutil.copytree(prepared, tmp_path / run, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
        return load_project(pn, [f"run_dir={tmp_path / run}", "model.projected.clusters=2",
                                                    "model.projected.m=4", "model.projected.h=8", "train.eval_every=3"])
    torch.set_num_threads(1)
    result = train(project("straight"))
    assert [c for c, _ in validations[-2:]] == [0, 1] and {c for c, _ in validations} == {0, 1}
    assert result["val_loss"] == pytest.approx((validations[-2][1] + validations[-1][1]) / 2, abs=1e-9)
    assert validations[-2][1] != validations[-1][1]             # two experts, on the same val text here
    train(project("resumed"), stop_after_steps=4)
    train(project("resumed"))
    a = load_file(str(tmp_path / "straight/checkpoints/step_0000006/model.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/step_0000006/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("experts" in k for k in a) and any("basis" in k for k in a)      # it is the projected network
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()
              if "train_loss" in line]
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match=r"nichelm specialize"):
        export(tmp_path / "straight", "hf", tmp_path / "hf")
    assert (export(specialize(project("straight"), cluster=1), "hf", tmp_path / "hf1") / "model.safetensors").exists()
    shutil.copytree(prepared, tmp_path / "c", ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    with pytest.raises(UserError, match=r"one data folder per cluster"):
        train(load_project(projected_run["file"], [f"run_dir={tmp_path / 'c'}", "model.projected.clusters=2",
                                                   "model.projected.m=4", "model.projected.h=8"]))

"""The Flower app against the simulation: same parameters, same per-site epsilon, faults handled.

The ServerApp's ``serve`` and the ClientApp run in this process over ``LocalGrid`` (conftest),
which delivers Flower messages to the ClientApp as a SuperNode would; the processes, TLS and
authentication of the deployment runtime are in loopback_test.py.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from fedjax_med.deploy import arrays, flower_app, protocol, server  # noqa: E402
from fedjax_med.trainers import federated  # noqa: E402
from fedjax_med.training import checkpoint  # noqa: E402

SPEC = "fedavg:tiny"
BASE = (
    "model.name=linear data.synthetic.image_size=16 data.synthetic.examples_per_site=30 "
    "federated.rounds=2 federated.eval_every=2 federated.checkpoint_every=2"
)
DP = (
    "data.normalization=fixed privacy.enabled=true privacy.noise_multiplier=1.0 "
    "privacy.clip_norm=1.0 privacy.method=vmap"
)


def _overrides(tmp, extra=""):
    return f"{BASE} data.cache_dir={tmp}/cache {extra}".strip()


def _nodes(overrides, sites=3, app=flower_app.client_app, **extra):
    nodes = {}
    for k in range(sites):
        cfg = {"config": SPEC, "overrides": overrides, "site": f"hospital_{k}", "data": "synthetic"}
        nodes[100 + k] = (app, {**cfg, **extra.get(k, {})})
    return nodes


def _final_params(workdir, template):
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    _, state, _ = ckpt.restore_latest(template)
    ckpt.close()
    return state.params


def _rounds(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "round"]


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory, local_grid):
    tmp = tmp_path_factory.mktemp("fedavg")
    overrides = _overrides(tmp)
    config = flower_app.load_config(SPEC, overrides)
    sim = federated.run_rounds(config, str(tmp / "sim"), quiet=True)
    deployed = server.serve(local_grid(_nodes(overrides)), config, str(tmp / "deploy"))
    plan = federated.build_plan(config)
    template = federated.init_server_state(plan)
    return {
        "sim": sim,
        "deployed": deployed,
        "initial_params": template.params,
        "sim_params": _final_params(str(tmp / "sim"), template),
        "deployed_params": _final_params(str(tmp / "deploy"), template),
        "tmp": tmp,
        "overrides": overrides,
    }


def test_deployed_fedavg_equals_the_simulation(fedavg):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        fedavg["deployed_params"],
        fedavg["sim_params"],
    )
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), fedavg["sim_params"], fedavg["initial_params"]
    )
    assert max(jax.tree.leaves(moved)) > 1e-4  # training moved the model: the equality is real
    sim, dep = fedavg["sim"], fedavg["deployed"]
    assert dep["federated"]["client_sizes"] == sim["federated"]["client_sizes"]
    assert dep["metrics"]["test_accuracy"] == pytest.approx(sim["metrics"]["test_accuracy"])
    assert set(dep["per_site"]) == set(sim["per_site"])
    for site, values in sim["per_site"].items():
        assert dep["per_site"][site]["test_accuracy"] == pytest.approx(values["test_accuracy"])


def test_deployed_round_records_match_the_simulation(fedavg):
    sim = _rounds(str(fedavg["tmp"] / "sim"))
    dep = _rounds(str(fedavg["tmp"] / "deploy"))
    assert len(sim) == len(dep) == 2
    for s, d in zip(sim, dep, strict=True):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert d["num_clients"] == s["num_clients"] == 3
        assert d["num_malformed"] == 0


def _simulated_epsilons(config) -> dict[str, float]:
    """The simulation's per-site epsilons after ``federated.rounds`` full rounds.

    The ledger run_rounds builds (build_plan) admits and records each round's cohort exactly as
    run_rounds does; training is not needed for the accounting.
    """
    plan = federated.build_plan(config)
    for t in range(config.federated.rounds):
        plan.ledger.record(plan.ledger.admit(plan.sampler.sample(t), t), True)
    return plan.ledger.per_site_epsilon()


def test_local_dp_epsilon_per_site_equals_the_simulation(tmp_path, local_grid):
    overrides = _overrides(tmp_path, DP + " federated.rounds=1")
    config = flower_app.load_config(SPEC, overrides)
    grid = local_grid(_nodes(overrides))
    dep = server.serve(grid, config, str(tmp_path / "deploy"))
    sim_eps = _simulated_epsilons(config)
    assert dep["privacy"]["per_site_epsilon"] == pytest.approx(sim_eps, rel=1e-9)
    assert all(0 < e < np.inf for e in sim_eps.values())
    assert dep["privacy"]["mechanism"] == "local_dp_sgd"
    # Each site's own ledger (kept on its node, never sent) says the same.
    for context in grid.contexts.values():
        site = flower_app.site_of(context.node_config)
        steps = int(context.state["fedjax_med_site"]["steps"])
        assert site.ledger(steps).epsilon(0) == pytest.approx(sim_eps[site.name], rel=1e-9)


def _tampering(corrupt):
    def app(message, context):
        reply = flower_app.client_app(message, context)
        if message.metadata.message_type == "train":
            delta = reply.content["delta"]
            name = next(iter(delta.keys()))
            delta[name] = corrupt(delta[name].numpy())
        return reply

    return app


def test_a_malformed_update_is_excluded_and_counted(tmp_path, caplog, local_grid):
    from flwr.app import Array

    overrides = _overrides(tmp_path, "federated.rounds=1")
    config = flower_app.load_config(SPEC, overrides)
    nodes = _nodes(overrides)
    nodes[101] = (_tampering(lambda a: Array(np.full_like(a, np.nan))), nodes[101][1])
    nodes[102] = (_tampering(lambda a: Array(a[..., :1].copy())), nodes[102][1])
    # An unlisted hospital: refused at the roster, the run goes on without it.
    nodes[103] = (flower_app.client_app, {**nodes[100][1], "site": "hospital_0"})
    with caplog.at_level(logging.WARNING, logger="fedjax_med"):
        server.serve(local_grid(nodes), config, str(tmp_path / "w"))
    (record,) = _rounds(str(tmp_path / "w"))
    assert record["num_malformed"] == 2 and record["num_excluded"] == 2
    assert record["num_clients"] == 1
    text = caplog.text
    assert "site hospital_1 excluded: malformed update" in text and "non-finite" in text
    assert "site hospital_2 excluded: malformed update" in text and "shape" in text
    assert "joined twice" in text


def test_received_trees_are_checked_leaf_by_leaf():
    template = {"b": np.zeros(2, np.float32), "w": np.zeros((2, 3), np.float32)}
    good = arrays.to_record(template)
    tree = arrays.from_record(good, template, what="delta")
    assert jax.tree.map(np.shape, tree) == jax.tree.map(np.shape, template)
    with pytest.raises(arrays.MalformedUpdate, match="do not match"):
        arrays.from_record(arrays.to_record({"w": template["w"]}), template, what="delta")
    with pytest.raises(arrays.MalformedUpdate, match=r"\['w'\]: shape"):
        bad = dict(template, w=np.zeros((3, 2), np.float32))
        arrays.from_record(arrays.to_record(bad), template, what="delta")
    with pytest.raises(arrays.MalformedUpdate, match="dtype"):
        bad = dict(template, b=np.zeros(2, np.float64))
        arrays.from_record(arrays.to_record(bad), template, what="delta")


@pytest.mark.parametrize("key", [jax.random.key(3), jax.random.PRNGKey(3)])
def test_keys_travel_unchanged(key):
    data, typed = arrays.key_to_array(key)
    back = arrays.array_to_key(data, typed)
    assert np.array_equal(jax.random.uniform(back, (4,)), jax.random.uniform(key, (4,)))


def test_a_site_with_its_own_budget_refuses_the_round_it_cannot_afford(tmp_path, local_grid):
    from flwr.app import Context, RecordDict

    from fedjax_med.federated import algorithms

    local_grid({})  # the server's task identity, which Flower messages carry
    overrides = _overrides(tmp_path, DP)
    config = flower_app.load_config(SPEC, overrides)
    plan = federated.build_plan(config)
    state = federated.init_server_state(plan)
    inputs = algorithms.gather_cohort(state, plan.client_data, np.arange(3), np.ones(3, bool), 0.0)
    node_config = {
        "config": SPEC,
        "overrides": overrides,
        "site": "hospital_0",
        "data": "synthetic",
        "target-epsilon": 1e-3,
    }
    context = Context(
        run_id=1, node_id=100, node_config=node_config, state=RecordDict(), run_config={}
    )
    message = protocol.train_message(100, state, inputs, 0, int(plan.client_data.mask.shape[1]))
    reply = flower_app.client_app(message, context)
    problem = protocol.reply_problem(reply)
    assert problem.startswith("refused: budget") and "delta" not in reply.content
    assert "fedjax_med_site" not in context.state  # nothing spent


def test_a_restarted_server_resumes_from_its_checkpoint(fedavg, tmp_path, local_grid):
    overrides = fedavg["overrides"] + " federated.checkpoint_every=1"
    config = flower_app.load_config(SPEC, overrides)

    class LinkLostInRound2(local_grid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.group_id == "round-1" for m in messages):
                raise ConnectionError("link lost")
            return super().push_messages(messages)

    workdir = str(tmp_path / "w")
    with pytest.raises(ConnectionError):
        server.serve(LinkLostInRound2(_nodes(overrides)), config, workdir)
    assert len(_rounds(workdir)) == 1
    server.serve(local_grid(_nodes(overrides)), config, workdir, resume=True)
    assert [r["step"] for r in _rounds(workdir)] == [1, 2]
    template = federated.init_server_state(federated.build_plan(config))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        _final_params(workdir, template),
        fedavg["deployed_params"],
    )


@pytest.mark.parametrize(
    "extra",
    [
        "federated.algorithm=scaffold",
        "federated.algorithm=dp_fedavg federated.adaptive_clipping=true data.normalization=fixed "
        "privacy.noise_multiplier=0.1 privacy.clip_norm=0.5 privacy.delta=0.01",
    ],
    ids=["scaffold", "dp_fedavg_adaptive"],
)
def test_deployed_server_steps_equal_the_simulation(
    extra, tmp_path, local_grid, compilation_cache
):
    """SCAFFOLD (its controls c and c_k) and DP-FedAvg with adaptive clipping (its noised clip S
    and epsilon) over Flower messages equal the simulation after a round. The sites load the
    local update the simulation compiled (the compilation cache), so each costs one compile."""
    overrides = _overrides(tmp_path, extra + " federated.rounds=1")
    config = flower_app.load_config(SPEC, overrides)
    with compilation_cache(str(tmp_path / "jax_cache")):
        sim = federated.run_rounds(config, str(tmp_path / "sim"), quiet=True)
        dep = server.serve(local_grid(_nodes(overrides)), config, str(tmp_path / "deploy"))
    template = federated.init_server_state(federated.build_plan(config))
    states = []
    for run in ("sim", "deploy"):
        ckpt = checkpoint.Checkpointer(str(tmp_path / run / "checkpoints"))
        states.append(ckpt.restore_latest(template)[1])
        ckpt.close()
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # noqa: E731
    jax.tree.map(close, states[0].params, states[1].params)
    if states[0].client_controls is not None:  # SCAFFOLD's c and every c_k
        jax.tree.map(close, states[0].client_controls, states[1].client_controls)
        jax.tree.map(close, states[0].server_control, states[1].server_control)
    if states[0].clip_norm is not None:  # adaptive clipping's S after its noised count
        close(states[0].clip_norm, states[1].clip_norm)
        assert dep["privacy"]["epsilon"] == pytest.approx(sim["privacy"]["epsilon"])


def test_secure_aggregation_deployed_equals_the_simulation_and_hides_each_update(
    tmp_path, local_grid
):
    from fedjax_med.deploy import secure
    from fedjax_med.secure import field, secagg

    overrides = _overrides(tmp_path, "secure_aggregation.method=secagg federated.rounds=1")
    config = flower_app.load_config(SPEC, overrides)

    class Recording(local_grid):
        sent, received = [], []

        def push_messages(self, messages):
            messages = list(messages)
            self.sent += messages
            return super().push_messages(messages)

        def pull_messages(self, message_ids):
            replies = super().pull_messages(message_ids)
            self.received += replies
            return replies

    grid = Recording(_nodes(overrides))
    dep = server.serve(grid, config, str(tmp_path / "deploy"))
    sim = federated.run_rounds(config, str(tmp_path / "sim"), quiet=True)
    plain_config = flower_app.load_config(SPEC, _overrides(tmp_path, "federated.rounds=1"))
    federated.run_rounds(plain_config, str(tmp_path / "plain"), quiet=True)
    template = federated.init_server_state(federated.build_plan(config))
    params = {r: _final_params(str(tmp_path / r), template) for r in ("deploy", "sim", "plain")}
    # The same protocol and quantisation as the simulation's secure round...
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # noqa: E731
    jax.tree.map(close, params["deploy"], params["sim"])
    # ...and the plain sum to quantisation tolerance (2^-31 scale: far below float32 noise).
    quantised = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)  # noqa: E731
    jax.tree.map(quantised, params["deploy"], params["plain"])
    (record,) = _rounds(str(tmp_path / "deploy"))
    assert record["num_clients"] == 3 and record["secure_sum_released"] == 1
    assert dep["deployment"]["secure_aggregation"] == "secagg"
    assert dep["metrics"]["test_accuracy"] == pytest.approx(sim["metrics"]["test_accuracy"])

    # What the server received from hospital_0: public keys, ciphertexts, a masked vector and
    # shares; never a delta or a loss, and the masked vector is not hospital_0's message.
    from_0 = [
        r
        for r in grid.received
        if r.metadata.src_node_id == 100 and r.metadata.group_id.startswith("round-")
    ]
    assert len(from_0) == 4 and all(set(r.content.keys()) == {"secagg"} for r in from_0)
    (masked,) = [r for r in from_0 if r.metadata.message_type == "query.secagg_masked_input"]
    y = secure.from_record(secagg.MaskedInput, masked.content["secagg"], sender=0).y
    (train,) = [m for m in grid.sent if m.metadata.dst_node_id == 100 and "secure" in m.content]
    site = flower_app.site_of(grid.contexts[100].node_config)
    request = protocol.read_train(train.content, template.params)
    output = site.train(request["params"], request["padded_size"], request["key"])
    s = train.content["secure"]
    row = secure.site_message(output, request["padded_size"], float(s["clip"]))
    own = field.FieldEncoder(float(s["bound"]), 3, 32).encode(row)
    assert y.shape == own.shape and np.mean(y == own) < 0.01


@pytest.mark.parametrize("kind", ["discrete_gaussian"])
def test_distributed_dp_over_deployed_secure_aggregation_equals_the_simulation(
    kind, tmp_path, local_grid, compilation_cache
):
    """Each hospital clips its delta, quantises it and adds its own share of the integer noise
    before masking; the server unmasks only the noisy sum. In reproducible mode the noise
    streams are the simulation's, so the deployed model is the simulated one, and the epsilon
    in report.json is the simulation's accountant's (zero-out neighbouring, released rounds)."""
    from fedjax_med.deploy import secure

    overrides = _overrides(
        tmp_path,
        f"secure_aggregation.method=secagg secure_aggregation.distributed_dp={kind} "
        "privacy.noise_multiplier=1.0 privacy.clip_norm=0.5 privacy.delta=1e-3 "
        "data.normalization=fixed federated.rounds=1",
    )
    config = flower_app.load_config(SPEC, overrides)
    with compilation_cache(str(tmp_path / "jax_cache")):
        sim = federated.run_rounds(config, str(tmp_path / "sim"), quiet=True)
        grid = local_grid(_nodes(overrides))
        dep = server.serve(grid, config, str(tmp_path / "deploy"))
    template = federated.init_server_state(federated.build_plan(config))
    params = {r: _final_params(str(tmp_path / r), template) for r in ("deploy", "sim")}
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, params["deploy"], params["sim"])
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()), params["deploy"], template.params
    )
    assert max(jax.tree.leaves(moved)) > 1e-3  # the noisy step moved the model
    (record,) = _rounds(str(tmp_path / "deploy"))
    assert record["secure_sum_released"] == 1 and record["num_clients"] == 3
    assert dep["privacy"]["mechanism"] == sim["privacy"]["mechanism"] == "distributed_dp"
    assert dep["privacy"]["epsilon"] == pytest.approx(sim["privacy"]["epsilon"], rel=1e-12)
    assert 0 < dep["privacy"]["epsilon"] < np.inf
    # The site calibrates its own noise from its own config (the simulation's accountant), and
    # in secure mode draws it from the OS afresh each time, never from the seed.
    import dataclasses
    import types

    from fedjax_med import randomness

    site = flower_app.site_of(grid.contexts[100].node_config)
    ddp = site.distributed_dp(3)
    assert ddp.epsilon(1) == pytest.approx(sim["privacy"]["epsilon"], rel=1e-12)
    output = types.SimpleNamespace(delta=jax.tree.map(np.ones_like, template.params))
    seeded = [secure.site_noisy_update(output, ddp, 0, 0) for _ in range(2)]
    assert np.array_equal(*seeded)  # reproducible mode: the simulation's stream
    private = dataclasses.replace(ddp, randomness=randomness.Randomness("secure", 0))
    fresh = [secure.site_noisy_update(output, private, 0, 0) for _ in range(2)]
    assert not np.array_equal(*fresh)


def test_a_restarted_server_resumes_with_every_ledger_intact(tmp_path, local_grid):
    """Local DP-SGD: the server's per-site ledger (checkpointed) and each site's own (on its
    disk) survive a restart, which Flower runs as a new run with fresh Contexts."""
    overrides = _overrides(tmp_path, DP + " federated.checkpoint_every=1")
    config = flower_app.load_config(SPEC, overrides)

    def nodes():
        out = _nodes(overrides)
        for node, (app, cfg) in out.items():
            out[node] = (app, {**cfg, "state-dir": str(tmp_path / f"site{node - 100}")})
        return out

    class LinkLostInRound2(local_grid):
        def push_messages(self, messages):
            messages = list(messages)
            if any(m.metadata.group_id == "round-1" for m in messages):
                raise ConnectionError("link lost")
            return super().push_messages(messages)

    workdir = str(tmp_path / "w")
    with pytest.raises(ConnectionError):
        server.serve(LinkLostInRound2(nodes()), config, workdir)
    report = server.serve(local_grid(nodes()), config, workdir, resume=True)
    expected = _simulated_epsilons(config)
    assert [r["step"] for r in _rounds(workdir)] == [1, 2]
    assert report["privacy"]["per_site_epsilon"] == pytest.approx(expected, rel=1e-9)
    one_round = _simulated_epsilons(flower_app.load_config(SPEC, overrides + " federated.rounds=1"))
    assert expected["hospital_0"] > one_round["hospital_0"]  # the second round was charged
    for k in range(3):
        (path,) = (tmp_path / f"site{k}").iterdir()
        ledger = json.loads(path.read_text())
        assert ledger["steps"] == 2 * config.federated.local_steps
        assert ledger["epsilon"] == pytest.approx(expected[f"hospital_{k}"], rel=1e-9)


def test_a_hospital_that_drops_out_and_rejoins_is_counted_and_trains_again(
    fedavg, tmp_path, local_grid, caplog
):
    class Hospital1AwayInRound1(local_grid):
        def push_messages(self, messages):
            messages = list(messages)
            away = [
                m
                for m in messages
                if m.metadata.group_id == "round-0" and m.metadata.dst_node_id == 101
            ]
            kept = [m for m in messages if m not in away]
            return super().push_messages(kept) + [f"lost-{i}" for i in range(len(away))]

    config = flower_app.load_config(SPEC, fedavg["overrides"])
    workdir = str(tmp_path / "w")
    with caplog.at_level(logging.WARNING, logger="fedjax_med"):
        grid = Hospital1AwayInRound1(_nodes(fedavg["overrides"]))
        server.serve(grid, config, workdir, round_timeout=0.5)
    rounds = _rounds(workdir)
    assert [r["num_dropped"] for r in rounds] == [1, 0]
    assert [r["num_clients"] for r in rounds] == [2, 3]
    assert "round 1: site hospital_1 dropped: no reply" in caplog.text
    template = federated.init_server_state(federated.build_plan(config))
    moved = jax.tree.map(
        lambda a, b: float(np.abs(a - b).max()),
        _final_params(workdir, template),
        fedavg["deployed_params"],
    )
    assert max(jax.tree.leaves(moved)) > 1e-6  # round 1 without hospital_1 changed the model


def test_a_malformed_masked_input_is_excluded_and_its_masks_removed(tmp_path, local_grid):
    """hospital_2 sends a masked vector of the wrong length: the server rejects it, recovers the
    pairwise masks it left in the others' vectors, and releases the sum of the other two, which
    is what a plain round that excludes hospital_2's update computes."""
    from flwr.app import Array, ConfigRecord

    def bad_masked_input(message, context):
        reply = flower_app.client_app(message, context)
        if message.metadata.message_type == "query.secagg_masked_input":
            fields = json.loads(reply.content["secagg"]["json"])
            fields["y"]["u64"] = fields["y"]["u64"][:-16]  # one coordinate short
            reply.content["secagg"] = ConfigRecord({"json": json.dumps(fields)})
        return reply

    def nan_delta(message, context):
        reply = flower_app.client_app(message, context)
        if message.metadata.message_type == "train":
            delta = reply.content["delta"]
            for name in list(delta.keys()):
                delta[name] = Array(np.full_like(delta[name].numpy(), np.nan))
        return reply

    runs = {}
    for name, extra, app in (
        ("secure", "secure_aggregation.method=secagg", bad_masked_input),
        ("plain", "", nan_delta),
    ):
        overrides = _overrides(tmp_path, f"{extra} federated.rounds=1")
        nodes = _nodes(overrides)
        nodes[102] = (app, nodes[102][1])
        config = flower_app.load_config(SPEC, overrides)
        server.serve(local_grid(nodes), config, str(tmp_path / name))
        (runs[name],) = _rounds(str(tmp_path / name))
    assert runs["secure"]["num_malformed"] == 1 and runs["secure"]["num_clients"] == 2
    assert runs["secure"]["secure_sum_released"] == 1
    template = federated.init_server_state(federated.build_plan(config))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
        _final_params(str(tmp_path / "secure"), template),
        _final_params(str(tmp_path / "plain"), template),
    )

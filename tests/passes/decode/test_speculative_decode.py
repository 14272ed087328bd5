"""speculative_decode: the rewritten loop against greedy decoding (exact acceptance is lossless,
relaxed acceptance keeps every token within the radius of the head's own choice), each drafter
against an independent emulation, the plan it builds, and the artifact torch-free."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pared.ir.capture import capture
from pared.ir.decode import TOKENS
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Loop, Select, iter_nodes
from pared.ir.transform import PassContext
from pared.passes.decode import drafters
from pared.passes.decode.speculative_decode import ACCEPT, DRAFT, K_UPDATE, SpeculativeDecode
from pared.testing import run_pass_checked, tiny_decoder, tiny_decoder_inputs, tiny_draft_sampler, tiny_transformer

N = 8


@pytest.fixture(scope="module")
def tiny():
    m, ex = tiny_decoder()
    calib = [tiny_decoder_inputs(1, 100 + i) for i in range(32)]
    return m, capture(m, ex), calib


def _tokens_out(prog):
    """`prog` returning the decoded tokens instead of the detokenized outputs."""
    return prog.replace(plan=dataclasses.replace(prog.plan, outputs=(TOKENS,)))


def _heads(runner) -> int:
    return sum(g == "head" for g in runner.graph_trace[-1])


def _run(prog, inputs: list[tuple], reset_each: bool = True):
    r = prog.runner()
    outs, heads = [], []
    for x in inputs:
        if reset_each:
            r.reset()
        outs.append(r(list(x))[0])
        heads.append(_heads(r))
    return outs, heads


# -- the acceptance step against a plain Python verify loop ------------------------------------------
def _accept_reference(logits, tokens, n, radius, refill, sequence=None):
    pred = logits.argmax(-1)
    tokens, n = tokens.clone(), n.clone()
    for b in range(tokens.shape[0]):
        m = int(n[b])
        free = [abs(int(tokens[b, j]) - int(pred[b, j])) for j in range(m, tokens.shape[1])]
        if sequence is not None and sum(free) <= sequence * max(len(free), 1):
            n[b] = tokens.shape[1]                  # HeiSD sequence-wise: the whole draft as it is
            continue
        while m < tokens.shape[1] and abs(int(tokens[b, m]) - int(pred[b, m])) <= radius:
            m += 1
        if m < tokens.shape[1]:
            tokens[b, m] = pred[b, m]
            if refill == "head":
                tokens[b, m + 1:] = pred[b, m + 1:]
        n[b] = min(m + 1, tokens.shape[1])
    return tokens, n


@pytest.mark.parametrize("radius,refill,sequence", [(0, "draft", None), (0, "head", None), (2, "draft", None),
                                                   (3, "head", None), (0, "head", 1.0), (1, "draft", 0.5)])
def test_accept_matches_a_python_verify_step(radius, refill, sequence):
    g = torch.Generator().manual_seed(radius)
    for trial in range(30):
        logits = torch.randn(3, N, 6, generator=g)
        pred = logits.argmax(-1)
        # drafts that agree with the argmax for a while, then not
        tokens = torch.where(torch.rand(3, N, generator=g) < 0.7, pred, torch.randint(0, 6, (3, N), generator=g))
        n = torch.randint(0, N, (3, 1), generator=g)
        got_t, got_n, done = drafters.Accept(radius, refill, sequence)(logits, tokens, n)
        want_t, want_n = _accept_reference(logits, tokens, n, radius, refill, sequence)
        assert torch.equal(got_t, want_t) and torch.equal(got_n, want_n)
        assert int(done) == int(bool((want_n >= N).all()))


# -- the rewritten loop ------------------------------------------------------------------------
@pytest.mark.parametrize("drafter,opts", [("retrieval", {}), ("none", {}), ("kalman", {"action_dim": 2}),
                                          ("retrieval", {"refill": "draft"}),
                                          ("distilled", {"draft_steps": 150, "draft_hidden": 64}),
                                          ("hybrid", {"hybrid": ("none", "retrieval"), "motion_input": "obs",
                                                      "position": (0, 1, 2), "previous": (3, 4, 5)})])
def test_exact_acceptance_gives_greedy_decodings_tokens(tiny, drafter, opts):
    m, prog, calib = tiny
    res = run_pass_checked(SpeculativeDecode(drafter=drafter, **opts), prog, PassContext(calibration=calib))
    held = [tiny_decoder_inputs(base=calib[i], seed=500 + i) for i in range(6)] + \
           [tiny_decoder_inputs(1, 900 + i) for i in range(6)]
    # one request: the Kalman drafter carries its history from call to call
    outs, heads = _run(res.program, held, reset_each=False)
    with torch.no_grad():
        for x, got in zip(held, outs):
            assert torch.equal(got, m(*x)), "exact acceptance must reproduce greedy decoding bit for bit"
    assert all(1 <= h <= N for h in heads)
    assert res.program.records["SpeculativePlan"].lossless


def test_retrieval_drafts_cut_head_calls_on_observations_near_the_table(tiny):
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="retrieval")(prog, PassContext(calibration=calib))
    near = [tiny_decoder_inputs(base=calib[i], seed=500 + i) for i in range(8)]
    _, heads = _run(res.program, near)
    # measured: 1.0 (the nearest row's tokens are the greedy ones); greedy decoding needs N
    assert np.mean(heads) <= 2.0, heads


@pytest.mark.parametrize("radius", [1, 3])
def test_relaxed_acceptance_keeps_every_token_within_radius_of_the_heads_choice(tiny, radius):
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="none", radius=radius)(prog, PassContext(calibration=calib))
    inputs = [tiny_decoder_inputs(1, 700 + i) for i in range(10)]
    r = res.program.runner()
    t_prog = _tokens_out(res.program)
    tr = t_prog.runner()
    heads_relaxed, heads_exact = [], []
    exact = SpeculativeDecode(drafter="none")(prog, PassContext()).program.runner()
    for x in inputs:
        tr.reset()
        tokens = tr(list(x))[0]
        with torch.no_grad():
            pred = m.head(tokens, *m.cond(*x)).argmax(-1)
        # each final token was accepted given its final prefix: within `radius` of the head's argmax there
        assert int((tokens - pred).abs().max()) <= radius
        r.reset(), exact.reset()
        r(list(x)), exact(list(x))
        heads_relaxed.append(_heads(r))
        heads_exact.append(_heads(exact))
    assert np.mean(heads_relaxed) <= np.mean(heads_exact)


def test_the_plan_keeps_the_head_call_and_replaces_the_pick(tiny):
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="kalman", action_dim=2)(prog, PassContext())
    plan = res.program.plan
    loops = [n for n in iter_nodes(plan.body) if isinstance(n, Loop)]
    # one verify loop per case of the cold/warm select (they differ only under max_verify)
    assert len(loops) == 2 and all(lp.until is not None and lp.max_iters == N and lp.count is None for lp in loops)
    assert all([c.graph for c in lp.body.nodes] == ["head", ACCEPT] for lp in loops)
    graphs = {c.graph for c in plan.calls()}
    assert "decode.pick" not in graphs and {DRAFT, f"{DRAFT}.cold", K_UPDATE} <= graphs
    selects = [n for n in iter_nodes(plan.body) if isinstance(n, Select)]
    assert [s.selector.kind for s in selects] == ["table", "table"]      # cold start, then the filters' history
    assert [s.name for s in plan.state] == ["speculative_decode.kalman"]
    # running it again finds nothing more to do
    again = SpeculativeDecode(drafter="kalman", action_dim=2)(res.program, PassContext())
    assert not again.modified and again.program is res.program


def test_after_a_graph_pass_the_rewritten_head_is_the_one_verified(tiny):
    """quantize the head first: the speculative loop calls the quantized head, and exact acceptance
    reproduces greedy decoding of the quantized program."""
    from pared.passes.quant.quantize_linears import QuantizeLinears
    from pared.ir.target import get_target
    m, prog, calib = tiny
    ctx = PassContext(calibration=calib, target=get_target("cpu"))
    q = QuantizeLinears(mode="dynamic")(prog, ctx).program
    s = SpeculativeDecode(drafter="none")(q, PassContext()).program
    assert s.graphs["head"] is q.graphs["head"]
    held = [tiny_decoder_inputs(1, 300 + i) for i in range(8)]
    a, _ = _run(q, held)
    b, _ = _run(s, held)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_distilled_draft_learns_the_heads_tokens(tiny):
    """Trained at compile time on the calibration inputs' greedy tokens: it fits them, its draft
    graph reads the head's condition, and it drafts better than zeros on nearby observations."""
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="distilled", draft_steps=400, draft_hidden=64)(prog, PassContext(calibration=calib))
    rec = res.program.records["SpeculativePlan"]
    assert rec.loss_last < 0.5 * rec.loss_first and rec.train_token_accuracy > 0.9
    draft_call = next(c for c in res.program.plan.calls() if c.graph == DRAFT)
    assert draft_call.inputs == prog.records["DecodeLoop"].cond
    near = [tiny_decoder_inputs(base=calib[i], seed=500 + i, noise=0.01) for i in range(8)]
    _, heads = _run(res.program, near)
    _, heads_none = _run(SpeculativeDecode(drafter="none")(prog, PassContext()).program, near)
    assert np.mean(heads) < np.mean(heads_none), (heads, heads_none)


# -- drafters against independent emulations ------------------------------------------------------
def test_retrieval_returns_the_nearest_rows_tokens_and_never_a_mismatched_id():
    g = torch.Generator().manual_seed(0)
    keys_f = torch.randn(50, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0])
    keys_i = torch.randint(0, 3, (50, 2), generator=g)
    rows = torch.randint(0, 16, (50, N), generator=g)
    mod = drafters.Retrieval([keys_f], [keys_i], rows, [("f", 0), ("i", 0)])
    std = keys_f.std(0)
    for trial in range(40):
        qf = torch.randn(1, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 1.0, 3.0])
        qi = keys_i[trial % 50][None]
        d = (((qf - keys_f) / std) ** 2).sum(-1).numpy()
        d[(keys_i != qi).any(-1).numpy()] = np.inf
        assert torch.equal(mod(qf, qi)[0], rows[int(np.argmin(d))])


def _kalman_reference(zs, q, r, horizon):
    """Matrix-form constant-velocity Kalman filter (numpy): start at z0 with zero velocity, take
    the rest, then predict `horizon` positions."""
    F = np.array([[1.0, 1.0], [0.0, 1.0]])
    G = np.array([[0.5], [1.0]])
    Q = q * G @ G.T
    H = np.array([[1.0, 0.0]])
    x = np.array([zs[0], 0.0])
    P = np.diag([r, 4.0 * r])
    for z in zs[1:]:
        x, P = F @ x, F @ P @ F.T + Q
        S = H @ P @ H.T + r
        K = P @ H.T / S
        x = x + (K * (z - H @ x)).ravel()
        P = (np.eye(2) - K @ H) @ P
    return np.array([x[0] + k * x[1] for k in range(1, horizon + 1)])


def test_kalman_filters_match_the_matrix_form():
    h, a, q, r = 4, 3, 16.0, 4.0
    g = torch.Generator().manual_seed(1)
    calls = [torch.randint(0, 256, (1, h * a), generator=g) for _ in range(3)]
    state = drafters.KalmanStart(h, a, q, r)(calls[0])
    for c in calls[1:]:
        state = drafters.KalmanUpdate(h, a, q, r)(c, state)
    draft = drafters.KalmanDraft(h, a, 256)(state)
    zs = torch.cat([c.reshape(h, a) for c in calls]).double().numpy()
    for dim in range(a):
        want = _kalman_reference(zs[:, dim], q, r, h)
        assert np.allclose(draft.reshape(h, a)[:, dim].numpy(), np.clip(np.round(want), 0, 255)), dim


def test_the_kalman_draft_follows_a_constant_velocity_motion():
    """On a request whose actions move at constant speed, the filters' draft is the next actions."""
    h, a = 4, 2
    ramp = torch.arange(0, 40).reshape(-1, h * a)       # 5 calls of 4 actions x 2 dims, +1 bin per value
    calls = [(torch.stack([c[0::2], c[1::2] * 0 + 100], 1).reshape(1, -1)) for c in ramp]
    state = drafters.KalmanStart(h, a, 16.0, 4.0)(calls[0])
    for c in calls[1:4]:
        state = drafters.KalmanUpdate(h, a, 16.0, 4.0)(c, state)
    draft = drafters.KalmanDraft(h, a, 256)(state)
    assert (draft - calls[4]).abs().max() <= 1


# -- options and errors ----------------------------------------------------------------------------
def test_bad_options_and_programs_are_named(tiny, tmp_path):
    m, prog, calib = tiny
    with pytest.raises(OptionError, match="drafter 'kalman' needs option 'action_dim'"):
        SpeculativeDecode(drafter="kalman")
    with pytest.raises(OptionError, match="option 'radius' must be in \\[0, inf\\]"):
        SpeculativeDecode(radius=-1)
    with pytest.raises(OptionError, match="options 'keys', 'table' and 'skip_verify' belong to drafter 'retrieval'"):
        SpeculativeDecode(drafter="none", keys=("obs",))
    with pytest.raises(OptionError, match="option 'action_dim' \\(3\\) does not divide the 8 tokens"):
        SpeculativeDecode(drafter="kalman", action_dim=3)(prog, PassContext())
    with pytest.raises(OptionError, match="option 'keys': \\['img'\\] are not inputs of the program"):
        SpeculativeDecode(keys=("img",))(prog, PassContext(calibration=calib))
    with pytest.raises(PassError, match="drafter .retrieval. learns from calibration inputs"):
        SpeculativeDecode()(prog, PassContext())
    plain = capture(*tiny_transformer())
    with pytest.raises(PassError, match="wrap the model in pared.ir.decode.Decoder"):
        SpeculativeDecode(drafter="none")(plain, PassContext())
    bad = tmp_path / "table.npz"
    np.savez(bad, obs=np.zeros((4, 6), np.float32), tokens=np.zeros((4, 5), np.int64))
    with pytest.raises(OptionError, match="'tokens' in .* must be \\(M, 8\\)"):
        SpeculativeDecode(table=str(bad), keys=("obs",))(prog, PassContext())
    with pytest.raises(OptionError, match="does not exist"):
        SpeculativeDecode(table=str(tmp_path / "nope.npz"))(prog, PassContext())
    # a loop whose head an earlier pass replaced by something else altogether
    renamed = prog.replace(graphs={("other" if k == "head" else k): g for k, g in prog.graphs.items()},
                           plan=prog.plan.replace_calls("head", lambda c: dataclasses.replace(c, graph="other")))
    with pytest.raises(PassError, match=r"calls neither its head graph 'head' nor variants of it"):
        SpeculativeDecode(drafter="none")(renamed, PassContext())
    # variants behind a select that may choose per token (bins on the position): refused, naming the order
    from pared.ir.plan import Bins
    per_token = prog.replace(
        graphs={**{k: g for k, g in prog.graphs.items() if k != "head"}, "head.x": prog.graphs["head"],
                "head.y": prog.graphs["head"]},
        plan=prog.plan.replace_calls("head", lambda c: Select(Bins("decode.pos", (4.0,), ("x", "y")), (
            ("x", dataclasses.replace(c, graph="head.x")), ("y", dataclasses.replace(c, graph="head.y"))))))
    with pytest.raises(PassError, match=r"by a 'bins' select, which may choose anew at each token.*Run "
                                        r"speculative_decode before that pass"):
        SpeculativeDecode(drafter="none")(per_token, PassContext())


# -- after dynamic_precision: verification through the per-call precision select ------------------------------
def _moving(n_calls: int, seed: int = 5) -> list[tuple]:
    """One request's observations: the first three values (the 'position') move at speeds that
    change over the request, so the motion select takes both widths."""
    g = torch.Generator().manual_seed(seed)
    obs0, task = tiny_decoder_inputs(1, seed)
    pos, out = obs0.clone(), []
    for i in range(n_calls):
        speed = 0.02 if (i // 4) % 2 == 0 else 0.8
        pos = pos.clone()
        pos[:, :3] += speed * torch.randn(1, 3, generator=g)
        out.append((pos, task))
    return out


@pytest.fixture(scope="module")
def precise(tiny):
    from pared.registry import get_pass
    m, prog, calib = tiny
    demo = _moving(32, seed=9)
    dp = get_pass("dynamic_precision")(input="obs", position=[0, 1, 2], bits=[8, 4], dwell=1)
    return dp(prog, PassContext(calibration=demo)).program, demo


@pytest.mark.parametrize("drafter", ["none", "retrieval"])
def test_after_dynamic_precision_each_call_verifies_with_its_width_and_stays_greedy(precise, drafter):
    quant, demo = precise
    res = run_pass_checked(SpeculativeDecode(drafter=drafter), quant, PassContext(calibration=demo))
    spec = res.program
    loops = [n for n in iter_nodes(spec.plan.body) if isinstance(n, Loop) and n.until is not None]
    assert loops
    sel = [n for n in iter_nodes(loops[0].body) if isinstance(n, Select)]
    assert [s.selector.kind for s in sel] == ["motion"] and {lab for lab, _ in sel[0].cases} == {"a8", "a4"}
    assert res.program.records["SpeculativePlan"].lossless
    # one request of moving observations: the same tokens as the quantized program's greedy loop,
    # call by call, and each call's head calls all at the width greedy decoding took for it
    calls = _moving(16)
    g, s = _tokens_out(quant).runner(), _tokens_out(spec).runner()
    widths, fewer = set(), 0
    for x in calls:
        want, got = g(list(x))[0], s(list(x))[0]
        assert torch.equal(torch.as_tensor(np.asarray(got)), torch.as_tensor(np.asarray(want)))
        gw = {name for name in g.graph_trace[-1] if name.startswith("head.")}
        sw = {name for name in s.graph_trace[-1] if name.startswith("head.")}
        assert len(gw) == 1 and sw == gw
        widths |= gw
        fewer += sum(n.startswith("head.") for n in s.graph_trace[-1]) < N
    assert widths == {"head.a8", "head.a4"}        # the request took both widths
    assert fewer > 0


def test_a_table_file_drafts_its_tokens(tiny, tmp_path):
    """HeiSD's form: a table of stored trajectories (here: the greedy tokens of 8 observations)."""
    m, prog, calib = tiny
    obs = torch.cat([c[0] for c in calib[:8]])
    task = torch.cat([c[1] for c in calib[:8]])
    with torch.no_grad():
        tokens = torch.cat([_tokens(m, c) for c in calib[:8]])
    path = tmp_path / "demos.npz"
    np.savez(path, obs=obs.numpy(), task=task.numpy(), tokens=tokens.numpy())
    res = SpeculativeDecode(table=str(path))(prog, PassContext())
    assert res.program.records["SpeculativePlan"].table_rows == 8
    _, heads = _run(res.program, calib[:8])
    assert heads == [1] * 8                               # each draft is the greedy answer: one verify call


def _tokens(m, x):
    return m.tokens(*x)


# -- torch-free ----------------------------------------------------------------------------------
@pytest.mark.parametrize("drafter,opts", [("retrieval", {"radius": 0, "skip_verify": 0.3}),
                                          ("kalman", {"action_dim": 2, "radius": 1, "max_verify": 3}),
                                          ("distilled", {"draft_steps": 50, "draft_hidden": 32})])
def test_the_artifact_runs_the_same_loop_torch_free(tiny, tmp_path, drafter, opts):
    import pared
    m, prog, calib = tiny
    held = [tiny_decoder_inputs(base=calib[i], seed=40 + i) for i in range(4)] + \
           [tiny_decoder_inputs(1, 60 + i) for i in range(4)]
    opt = pared.optimize(m, tiny_decoder_inputs(1, 1), target="cpu", calibration=calib, bench_repeats=0,
                         pipeline=[{"speculative_decode": {"drafter": drafter, **opts}}], allow_fidelity_loss=True,
                         holdout=held[:1])
    path = opt.save(str(tmp_path / "art"))
    ex = pared.load(path)
    r = opt.program.runner()
    for x in held:                                          # one request on both sides
        got = ex(*[t.numpy() for t in x])
        want = r(list(x))[0]
        assert np.array_equal(np.asarray(got), want.numpy())
        assert ex.graph_trace[-1] == r.graph_trace[-1]
    assert "SpeculativePlan" in ex.records


@pytest.mark.slow
def test_after_dynamic_precision_the_artifact_decodes_as_the_quantized_greedy_artifact(precise, tiny, tmp_path):
    """torch-free, on ORT's integer kernels: the composed artifact against dynamic_precision's alone,
    one request of moving observations, the same tokens and width per call, fewer head calls."""
    import pared
    m, _, _ = tiny
    _, demo = precise
    dp = {"dynamic_precision": {"input": "obs", "position": [0, 1, 2], "bits": [8, 4], "dwell": 1}}
    arts = {}
    for name, pipe in (("greedy", [dp]), ("spec", [dp, {"speculative_decode": {"drafter": "retrieval"}}])):
        opt = pared.optimize(m, demo[0], target="cpu", calibration=demo, bench_repeats=0, pipeline=pipe,
                             allow_fidelity_loss=True, holdout=demo[:1])
        arts[name] = pared.load(opt.save(str(tmp_path / name)))
    heads = {"greedy": 0, "spec": 0}
    widths = set()
    for x in _moving(12):
        outs, w = {}, {}
        for name, ex in arts.items():
            outs[name] = np.asarray(ex(*[t.numpy() for t in x]))
            calls = [g for g in ex.graph_trace[-1] if g.startswith("head.")]
            heads[name] += len(calls)
            w[name] = set(calls)
        assert np.array_equal(outs["spec"], outs["greedy"])
        assert len(w["greedy"]) == 1 and w["spec"] == w["greedy"]
        widths |= w["greedy"]
    assert widths == {"head.a8", "head.a4"}
    assert heads["spec"] < heads["greedy"] == 12 * N


# -- the lossy savings: capped verification (KERV completion) and verify-skip (HeiSD) -------------
def test_max_verify_caps_head_calls_and_keeps_the_verified_prefix(tiny):
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="none", refill="draft", max_verify=1)(prog, PassContext())
    assert not res.program.records["SpeculativePlan"].lossless
    t_prog = _tokens_out(res.program)
    r = t_prog.runner()
    for i in range(8):
        x = tiny_decoder_inputs(1, 800 + i)
        r.reset()
        tokens = r(list(x))[0]
        assert _heads(r) == 1
        with torch.no_grad():
            greedy = _tokens(m, x)
        # one verify call over a zero draft: greedy's first token, and the zeros greedy agrees with after it
        k = int((greedy[0] != 0).nonzero()[0]) if (greedy != 0).any() else N
        assert torch.equal(tokens[0, :k + 1], greedy[0, :k + 1])
        assert (tokens[0, k + 1:] == 0).all()


def test_skip_verify_sends_a_near_neighbours_tokens_without_a_head_call(tiny):
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="retrieval", skip_verify=0.5)(prog, PassContext(calibration=calib))
    rec = res.program.records["SpeculativePlan"]
    assert rec.skip_verify_below > 0 and not rec.lossless
    sel = [n for n in iter_nodes(res.program.plan.body) if isinstance(n, Select)]
    assert [s.selector.kind for s in sel] == ["bins"]
    near = [tiny_decoder_inputs(base=calib[i], seed=500 + i, noise=1e-4) for i in range(6)]
    far = [tiny_decoder_inputs(base=calib[i], seed=4000 + i, noise=5.0) for i in range(6)]
    outs, heads = _run(res.program, near)
    assert heads == [0] * 6
    with torch.no_grad():              # the table's tokens are greedy's at the row: equal this near
        assert all(torch.equal(o, m(*x)) for o, x in zip(outs, near))
    _, heads_far = _run(res.program, far)
    assert all(h >= 1 for h in heads_far)


def test_kerv_completion_verifies_the_first_call_to_the_end(tiny):
    """max_verify caps the head calls only once the Kalman filters have a history: the first call of
    a request (a zero draft) is decoded as greedy decoding does."""
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="kalman", action_dim=2, refill="draft", max_verify=1)(prog, PassContext())
    seq = [tiny_decoder_inputs(1, 1200 + i) for i in range(5)]
    outs, heads = _run(res.program, seq, reset_each=False)
    with torch.no_grad():
        assert torch.equal(outs[0], m(*seq[0]))
    assert heads[0] >= 1 and heads[1:] == [1, 1, 1, 1]


def test_sequence_wise_acceptance_takes_whole_drafts_and_is_marked_lossy(tiny):
    m, prog, calib = tiny
    exact = run_pass_checked(SpeculativeDecode(drafter="retrieval"), prog, PassContext(calibration=calib))
    seq = run_pass_checked(SpeculativeDecode(drafter="retrieval", sequence=3.0), prog,
                           PassContext(calibration=calib))
    rec = seq.program.records["SpeculativePlan"]
    assert rec.sequence == 3.0 and not rec.lossless
    held = [tiny_decoder_inputs(base=calib[i], seed=700 + i, noise=0.3) for i in range(8)]
    _, h_exact = _run(exact.program, held)
    _, h_seq = _run(seq.program, held)
    assert sum(h_seq) < sum(h_exact) and min(h_seq) == 1          # whole drafts accepted in one call


# -- HeiSD's kinematic switch ----------------------------------------------------------------------
def test_hybrid_drafts_by_the_speed_of_the_state(tiny):
    """The fine drafter below the calibration speeds' fine_share quantile, the coarse one above it,
    each call's draft graph as the speed computed by hand says; tokens stay greedy decoding's."""
    m, prog, calib = tiny
    opts = dict(drafter="hybrid", hybrid=("none", "retrieval"), motion_input="obs", position=(0, 1, 2),
                previous=(3, 4, 5), fine_share=0.5)
    res = run_pass_checked(SpeculativeDecode(**opts), prog, PassContext(calibration=calib))
    rec = res.program.records["SpeculativePlan"]
    speeds = [float(torch.linalg.vector_norm(x[0][0, :3] - x[0][0, 3:6])) for x in calib]
    assert rec.hybrid == ("none", "retrieval") and rec.speed_edge == pytest.approx(float(np.median(speeds)))
    assert {f"{DRAFT}.none", f"{DRAFT}.retrieval"} <= set(res.program.graphs) and DRAFT not in res.program.graphs
    held = [tiny_decoder_inputs(1, 900 + i) for i in range(10)]
    r = res.program.runner()
    for x in held:
        out = r(list(x))[0]
        with torch.no_grad():
            assert torch.equal(out, m(*x))
        speed = float(torch.linalg.vector_norm(x[0][0, :3] - x[0][0, 3:6]))
        want = "none" if speed < rec.speed_edge else "retrieval"
        drafts = [g for g in r.graph_trace[-1] if g.startswith(DRAFT + ".")]
        assert drafts == [f"{DRAFT}.{want}"], (speed, rec.speed_edge, drafts)
    used = {g for t in r.graph_trace for g in t if g.startswith(DRAFT + ".")}
    assert len(used) == 2


@pytest.mark.parametrize("opts, msg", [
    ({"hybrid": ("kalman", "retrieval")}, "option 'hybrid' takes two different drafters"),
    ({"hybrid": ("none", "none")}, "option 'hybrid' takes two different drafters"),
    ({"position": ()}, "drafter 'hybrid' needs option 'position'"),
    ({"skip_verify": 0.3}, "option 'skip_verify' reads the retrieval distance"),
    ({"fine_share": 1.0}, "option 'fine_share' must be in \\(0, 1\\)"),
    ({"previous": (3,)}, "previous has 1 indices for the 3 of position"),
])
def test_hybrid_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        SpeculativeDecode(**{"drafter": "hybrid", "position": (0, 1, 2), **opts})


def test_hybrid_names_a_missing_state_input(tiny):
    _, prog, calib = tiny
    with pytest.raises(OptionError, match="option 'motion_input' names 'state', which is not a program input"):
        SpeculativeDecode(drafter="hybrid", position=(0, 1, 2))(prog, PassContext(calibration=calib))


# -- the denoiser drafter: another head's sampled action as the draft ------------------------------------
def _draft_sampler():
    return tiny_draft_sampler(seed=3)


def _draft_tokens_eager(m, x):
    """What the denoiser drafter proposes for inputs x, in eager PyTorch: the sampler run on the
    decoder's condition from its fixed initial sample."""
    sampler, noise = _draft_sampler()
    with torch.no_grad():
        cond = m.cond(*x)
        return sampler(*cond, noise.expand(cond[0].shape[0], *noise.shape[1:]))


def test_denoiser_drafts_are_the_samplers_binned_action_and_exact_acceptance_stays_greedy(tiny):
    m, prog, calib = tiny
    held = [tiny_decoder_inputs(1, 300 + i) for i in range(6)]
    res = run_pass_checked(SpeculativeDecode(drafter="denoiser", draft_model=_draft_sampler), prog, PassContext())
    outs, heads = _run(res.program, held)
    with torch.no_grad():
        for x, got in zip(held, outs):
            assert torch.equal(got, m(*x)), "exact acceptance must reproduce greedy decoding bit for bit"
    assert all(1 <= h <= N for h in heads)
    rec = res.program.records["SpeculativePlan"]
    assert rec.drafter == "denoiser" and rec.lossless and rec.sampler_steps == 6
    # accepting any token (radius = vocab): one head call, and the tokens are the draft itself, which
    # must be the eager sampler's binned action
    anything = SpeculativeDecode(drafter="denoiser", draft_model=_draft_sampler, radius=16)(prog, PassContext())
    r = _tokens_out(anything.program).runner()
    for x in held:
        r.reset()
        got = r(list(x))[0]
        assert _heads(r) == 1
        assert torch.equal(got, _draft_tokens_eager(m, x))


def test_the_denoiser_drafters_steps_are_a_steps_loop_that_action_cache_schedules(tiny):
    from pared.passes.cache.action_cache import ActionCache
    from pared.passes.decode.speculative_decode import NOISE
    m, prog, calib = tiny
    res = SpeculativeDecode(drafter="denoiser", draft_model=_draft_sampler)(prog, PassContext())
    plan = res.program.plan
    loop = res.program.records["DenoiseLoop"]
    assert (loop.head, loop.update, loop.start, loop.steps) == ("draft_head", "draft.update", "draft.start", 6)
    steps = plan.step_loops()
    assert len(steps) == 1 and steps[0].count == 6
    assert [c.graph for c in steps[0].body.nodes] == ["draft_head", "draft.update"]
    assert dict(plan.step_values)["draft.scale"] == (0.1,) * 6
    order = list(plan.graph_names)
    # the noise and the sampler run after the encoder and before the verify loop's head
    assert order.index("encoder") < order.index(NOISE) < order.index("draft_head") < order.index("head")
    assert "decode.pick" not in order
    # action_cache finds the drafter's head (not the token head) and schedules its sub-blocks; the
    # verify loop still checks every token, so the tokens stay greedy decoding's
    cached = run_pass_checked(ActionCache(schedule="interval", interval=2), res.program, PassContext())
    acp = cached.program.records.get("ActionCachePlan", graph="draft_head")
    assert acp is not None and acp.steps == 6 and cached.program.records.get("ActionCachePlan", graph="head") is None
    called = set(cached.program.plan.graph_names)
    assert "draft_head" not in called and any(g.startswith("draft_head.") for g in called) and "head" in called
    held = [tiny_decoder_inputs(1, 320 + i) for i in range(4)]
    outs, _ = _run(cached.program, held)
    with torch.no_grad():
        for x, got in zip(held, outs):
            assert torch.equal(got, m(*x))


def test_the_denoiser_drafter_artifact_runs_torch_free(tiny, tmp_path):
    import pared
    m, prog, calib = tiny
    held = [tiny_decoder_inputs(1, 340 + i) for i in range(4)]
    opt = pared.optimize(m, tiny_decoder_inputs(1, 1), target="cpu", bench_repeats=0, holdout=held[:1],
                         pipeline=[{"speculative_decode": {"drafter": "denoiser", "draft_model": _draft_sampler,
                                                           "radius": 2}}], allow_fidelity_loss=True)
    ex = pared.load(opt.save(str(tmp_path / "art")))
    r = opt.program.runner()
    for x in held:
        got = ex(*[t.numpy() for t in x])
        want = r(list(x))[0]
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-6)
        assert ex.graph_trace[-1] == r.graph_trace[-1]
    assert ex.records["SpeculativePlan"].drafter == "denoiser" and "DenoiseLoop" in ex.records


def test_denoiser_drafter_bad_options_are_named(tiny, tmp_path):
    from pared.ir.errors import PipelineError
    from pared.pipeline import build_passes
    m, prog, calib = tiny
    with pytest.raises(OptionError, match="drafter 'denoiser' needs option 'draft_model'"):
        SpeculativeDecode(drafter="denoiser")
    with pytest.raises(OptionError, match="option 'draft_model' belongs to drafter 'denoiser', not 'none'"):
        SpeculativeDecode(drafter="none", draft_model=_draft_sampler)
    with pytest.raises(OptionError, match="must return \\(a pared.ir.denoise.Denoiser, its initial sample"):
        SpeculativeDecode(drafter="denoiser", draft_model=lambda: _draft_sampler()[0])(prog, PassContext())
    with pytest.raises(OptionError, match="one float row \\(1, ...\\)"):
        SpeculativeDecode(drafter="denoiser",
                          draft_model=lambda: (_draft_sampler()[0], torch.zeros(2, 2, 4)))(prog, PassContext())

    def floats():               # no finish: the sampler returns its float sample, not tokens
        s, noise = _draft_sampler()
        return type(s)(s.encoder, s.head, s.update, s.schedule, s.head_values), noise
    with pytest.raises(PassError, match="finish must give the draft tokens, int64 of shape \\(1, 8\\)"):
        SpeculativeDecode(drafter="denoiser", draft_model=floats)(prog, PassContext())
    # in a pipeline, the factory is 'file.py:function' relative to the file; a missing one names the option
    f = tmp_path / "p.yaml"
    f.write_text("version: 1\npasses:\n  - speculative_decode: {drafter: denoiser, draft_model: nope.py:f}\n")
    with pytest.raises(PipelineError, match="option 'draft_model': nope.py:f: file .*nope.py does not exist"):
        build_passes(str(f))
    (tmp_path / "drafts.py").write_text("from pared.testing import tiny_draft_sampler\n"
                                        "def draft():\n    return tiny_draft_sampler(seed=3)\n")
    f.write_text("version: 1\npasses:\n  - speculative_decode: {drafter: denoiser, draft_model: drafts.py:draft}\n")
    (p,) = build_passes(str(f))
    assert callable(p.options.draft_model) and p.options.draft_model.__name__ == "draft"

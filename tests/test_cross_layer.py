"""Cross-layer transcoders: the decode formula, training, exact resume, export, and attribution graphs through one.

Oracles: a hand loop over (source, output) layer pairs for the decoder; the dense eager
decode for the sparse one (values and gradients); a straight run for a resumed one; the
model's own logits (completeness); autograd.functional.jacobian of a target with respect
to a multiplier on every source's writes into every layer (edges); and the graph of the
equivalent per-layer transcoders for a CLT whose only decoders are the diagonal ones.
"""

import copy

import pytest
import torch

from pipeline.sae.cross_layer import (
    DEFAULT_EXPANSION,
    CltConfig,
    CrossLayerTranscoder,
    decoder_parameters,
    export_clt,
    init_clt,
    training_bytes,
)
from pipeline.sae.cross_layer_training import (
    CltTrainState,
    clt_eval_weights,
    clt_state_tree,
    layer_scales,
    make_clt_optimizer,
    restore_clt_state_tree,
    stack_batch,
    train_clt,
)
from pipeline.sae.model import SaeConfig
from pipeline.sae.training import TrainConfig
from pipeline.sae.transcoder import Transcoder
from pipeline.tracing.attribution import active_features, attribute, feature_readouts, logit_readouts, target_logits
from pipeline.tracing.replacement import build_replacement, record_prompt, replacement_forward, replacement_logits
from pipeline.tracing.trace import trace
from tests.conftest import make_tiny_llama

N_LAYERS, D, F, K = 4, 32, 16, 4
ARCHS = ("topk", "batchtopk", "jumprelu")


def random_clt(cfg: CltConfig, seed: int = 0, dec_scale: float = 1.0) -> CrossLayerTranscoder:
    """Every weight random (float64), thresholds around the pre-activations' scale; ``dec_scale`` sizes what it
    writes (decoders, decoder bias, skip), kept near the tiny model's mlp-out so that the errors do not dwarf it."""
    generator = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(cfg).double()
    with torch.no_grad():
        for name, param in clt.named_parameters():
            scale = {"b_enc_LF": 0.1, "b_dec_LD": 1e-1 * dec_scale}.get(name, 1.0)
            scale = cfg.d_model**-0.5 if name.startswith("W_enc") else scale
            scale = dec_scale * cfg.d_model**-0.5 if name.startswith("W_skip") else scale
            scale = dec_scale if name.startswith("W_dec") else scale
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * scale)
        if cfg.architecture == "jumprelu":
            clt.log_threshold_LF.fill_(-1.0)
        if cfg.architecture == "batchtopk":
            clt.batch_threshold_L.fill_(0.3)
    return clt.eval()


def hand_decode(clt: CrossLayerTranscoder, acts_LNF, x_LND) -> torch.Tensor:
    """y[o] = b_dec[o] + sum_{l <= o} acts[l] @ W_dec[l][:, o - l] (+ x[o] @ W_skip[o]^T), one pair at a time."""
    L = clt.cfg.n_layers
    y = torch.zeros(L, acts_LNF.shape[1], clt.cfg.d_model, dtype=acts_LNF.dtype)
    for out in range(L):
        y[out] = clt.b_dec_LD[out]
        for source in range(out + 1):
            for f in range(clt.cfg.d_sae):
                W_FOD = clt.W_dec[source].view(clt.cfg.d_sae, L - source, clt.cfg.d_model)
                y[out] += acts_LNF[source, :, f, None] * W_FOD[f, out - source]
        if clt.cfg.skip:
            y[out] += x_LND[out] @ clt.W_skip[out].T
    return y


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("skip", [False, True])
def test_decode_is_the_formula_and_the_sparse_path_equals_it(arch, skip):
    clt = random_clt(CltConfig(3, 8, 12, arch, k=3, skip=skip))
    x_LND = torch.randn(3, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        acts_LNF = clt.encode(x_LND)
        expected = hand_decode(clt, acts_LNF, x_LND)
        torch.testing.assert_close(clt.decode(acts_LNF, x_LND), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(clt(x_LND).y_hat_LND, expected, rtol=0, atol=1e-12)
    assert 0 < (acts_LNF > 0).sum(-1).float().mean() < 12
    assert (acts_LNF[0] > 0).sum(-1).max() <= (3 if arch == "topk" else 12)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_path_gradients_equal_the_dense_twin(arch):
    cfg = CltConfig(3, 8, 12, arch, k=3, skip=True)
    x_LND = torch.randn(3, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y_LND = torch.randn(3, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for fast in (True, False):
        clt = random_clt(cfg)
        y_hat = clt(x_LND).y_hat_LND if fast else clt.decode(_dense_codes(clt, x_LND), x_LND)
        (y_hat - y_LND).pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in clt.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "W_enc.0" in grads[0] and "W_dec.2" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-12, msg=name)


def _dense_codes(clt, x_LND):
    """Inference codes with autograd: topk scattered, threshold ones through the same straight-through op."""
    codes = []
    for layer, x_ND in enumerate(x_LND):
        acts_NK, idx_NK, _ = clt.select(layer, x_ND)
        codes.append(torch.zeros(x_ND.shape[0], clt.cfg.d_sae, dtype=x_ND.dtype).scatter_add(1, idx_NK, acts_NK))
    return torch.stack(codes)


def planted_batches(n_layers=3, d=16, n_true=24, n=256, seed=0):
    """x random per layer; sparse true features of each layer write into that layer and every later one."""
    generator = torch.Generator().manual_seed(seed)
    enc = torch.randn(n_layers, n_true, d, generator=generator)
    dec = torch.randn(n_layers, n_true, n_layers, d, generator=generator) / 4
    while True:
        x = torch.randn(n_layers, n, d, generator=generator)
        y = torch.zeros(n_layers, n, d)
        for layer in range(n_layers):
            f = torch.relu(x[layer] @ enc[layer].T - 2.0)
            for out in range(layer, n_layers):
                y[out] += f @ dec[layer, :, out]
        yield {layer: (x[layer], y[layer] * (layer + 1)) for layer in range(n_layers)}


@pytest.mark.parametrize("arch", ARCHS)
def test_training_reduces_the_loss_on_a_planted_problem(arch):
    torch.manual_seed(0)
    batches = planted_batches(n=128)
    first = next(batches)
    scales = layer_scales(first, 3)
    _, y_LND = stack_batch(first, 3, scales)
    clt = init_clt(CltConfig(3, 16, 48, arch, k=6), y_LND, seed=0)
    cfg = TrainConfig(60, 3e-3, "adam", decay_fraction=0, auxk_dead_tokens=512, l0_coef=0.01, log_every=1)
    logs = []
    result = train_clt(clt, batches, cfg, scales, on_log=lambda stats, state: logs.append(stats))
    assert result.state.step == 60 and len(logs) == 60
    assert logs[-1].fvu < 0.6 * logs[0].fvu, [round(s.fvu, 3) for s in logs[::10]]
    for W in clt.W_dec:  # each feature's whole decoder row stays at unit norm
        torch.testing.assert_close(W.norm(dim=1), torch.ones(48), rtol=0, atol=1e-5)


def test_layer_scales_make_every_layer_norm_sqrt_d():
    first = next(planted_batches())
    s_in, s_out = layer_scales(first, 3)
    x_LND, y_LND = stack_batch(first, 3, (s_in, s_out))
    torch.testing.assert_close(y_LND.norm(dim=-1).mean(1), torch.full((3,), 16**0.5), rtol=1e-5, atol=0)
    assert s_out[0] > s_out[2]  # the planted outputs grow with the layer
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        stack_batch({0: first[0], 1: first[1]}, 3)


@pytest.mark.parametrize("optimizer", ["signum-sf", "adam"])
@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_resume_from_the_state_tree_is_exact(optimizer, arch):
    cfg = TrainConfig(total_steps=6, lr=2e-3, optimizer=optimizer, auxk_dead_tokens=512, checkpoint_every=3)
    first = next(planted_batches(n=128))
    scales = layer_scales(first, 3)

    def fresh():
        return init_clt(CltConfig(3, 16, 32, arch, k=4), stack_batch(first, 3, scales)[1], seed=0)

    straight = fresh()
    train_clt(straight, planted_batches(n=128, seed=5), cfg, scales)
    trees = []
    first_half = fresh()
    half_cfg = TrainConfig(**{**cfg.__dict__, "total_steps": 3})
    opt = make_clt_optimizer(first_half, half_cfg)
    train_clt(
        first_half,
        planted_batches(n=128, seed=5),
        half_cfg,
        scales,
        optimizer=opt,
        on_checkpoint=lambda state, o: trees.append(copy.deepcopy(clt_state_tree(first_half, o, state))),
    )
    resumed = CrossLayerTranscoder(first_half.cfg)
    opt = make_clt_optimizer(resumed, cfg)
    state = restore_clt_state_tree(trees[-1], resumed, opt)
    assert state.step == 3 and state.tokens_seen == 3 * 128
    batches = planted_batches(n=128, seed=5)
    for _ in range(3):
        next(batches)
    train_clt(resumed, batches, cfg, scales, state=state, optimizer=opt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_schedule_free_eval_weights_fold_decoder_norms_and_restore():
    first = next(planted_batches(n=128))
    scales = layer_scales(first, 3)
    clt = init_clt(CltConfig(3, 16, 32, "jumprelu"), stack_batch(first, 3, scales)[1], seed=0)
    cfg = TrainConfig(total_steps=4, lr=1e-2, optimizer="signum-sf")
    opt = make_clt_optimizer(clt, cfg)
    train_clt(clt, planted_batches(n=128), cfg, scales, optimizer=opt)
    before = {k: v.clone() for k, v in clt.state_dict().items()}
    x_LND, _ = stack_batch(first, 3, scales)
    with clt_eval_weights(clt, opt) as evaluated:
        assert all(torch.allclose(W.norm(dim=1), torch.ones(32)) for W in evaluated.W_dec)
        y_folded = evaluated.reconstruct(x_LND)
    for name, value in clt.state_dict().items():
        assert torch.equal(value, before[name]), name
    # the fold does not change what the averaged weights compute
    unfolded = copy.deepcopy(clt)
    with torch.no_grad():
        for p_name, p in unfolded.named_parameters():
            p.copy_(opt.eval_point(dict(clt.named_parameters())[p_name]))
    torch.testing.assert_close(y_folded, unfolded.reconstruct(x_LND), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_export_takes_raw_activations(arch):
    clt = random_clt(CltConfig(3, 8, 12, arch, k=3, skip=True)).train()
    clt.eval()
    s_in, s_out = torch.tensor([2.0, 0.5, 3.0]), torch.tensor([0.25, 4.0, 1.5])
    x_LND = torch.randn(3, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    exported = export_clt(clt, s_in, s_out)
    assert exported.cfg.architecture == ("jumprelu" if arch == "batchtopk" else "topk")
    with torch.no_grad():
        expected = clt.reconstruct(x_LND * s_in[:, None, None].double()) / s_out[:, None, None].double()
        torch.testing.assert_close(exported.reconstruct(x_LND), expected, rtol=1e-10, atol=1e-12)
        codes = clt.encode(x_LND * s_in[:, None, None].double()) / s_in[:, None, None].double()
        torch.testing.assert_close(exported.encode(x_LND), codes, rtol=1e-10, atol=1e-12)


def test_default_width_fits_24_gib_with_headroom_on_smollm2():
    width = DEFAULT_EXPANSION * 576
    assert decoder_parameters(30, 576, 8 * 576) == 1_234_206_720  # the "~1.2 B" at 8x
    assert training_bytes(30, 576, width) < 0.6 * 24 * 2**30
    assert training_bytes(30, 576, 2 * width) > 24 * 2**30


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown cross-layer transcoder architecture 'groupmax'"):
        CltConfig(2, 8, 16, "groupmax")
    with pytest.raises(ValueError, match="a relu CLT cannot be trained here"):
        train_clt(CrossLayerTranscoder(CltConfig(2, 8, 16, "relu")), iter([]), TrainConfig(1, 1e-3))
    with pytest.raises(ValueError, match="k must be between 1 and d_sae - 1 = 15"):
        CltConfig(2, 8, 16, "topk", k=16)
    with pytest.raises(ValueError, match="reads \\[L=2, N, D=8\\]"):
        CrossLayerTranscoder(CltConfig(2, 8, 16, k=4)).encode(torch.zeros(3, 4, 8))
    with pytest.raises(ValueError, match="pass the MLP inputs"):
        CrossLayerTranscoder(CltConfig(2, 8, 16, k=4, skip=True)).decode(torch.zeros(2, 4, 16))


# ---- attribution through a CLT ----


@pytest.fixture(scope="module")
def model(tokenizer):
    from tests.test_tracing import with_random_norm_weights

    return with_random_norm_weights(make_tiny_llama(len(tokenizer), n_layers=N_LAYERS, d_model=D).double())


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor(tokenizer("The cat sat on.").input_ids)


@pytest.fixture(scope="module", params=[False, True], ids=["no-skip", "skip"])
def clt(request):
    """Pre-activations of order 1 on mlp-in; writes of the order of the tiny model's mlp-out (~1e-3)."""
    return random_clt(CltConfig(N_LAYERS, D, F, "topk", k=K, skip=request.param), seed=3, dec_scale=1e-3)


@pytest.fixture(scope="module")
def rep(model, ids, clt):
    return build_replacement(record_prompt(model, ids), clt)


@pytest.fixture(scope="module")
def graph(model, rep):
    tokens, probs = target_logits(rep.record.logits_TV[-1])
    return attribute(model, rep, tokens, probs, batch_size=16)


def test_replacement_logits_with_a_clt_equal_the_models(model, ids, rep):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(replacement_logits(model, rep), logits, rtol=0, atol=1e-12)
    # later layers really receive earlier layers' writes
    assert rep.output_layers(0) == range(0, N_LAYERS) and rep.decoder_rows(1).shape == (F, (N_LAYERS - 1) * D)
    own_only = rep.acts[2] @ rep.transcoders[2].W_dec
    assert (rep.feature_writes(2) - own_only).abs().max() > 1e-4


def _clt_source_writes(rep, clt, sources, alpha_S):
    """embed and per-output-layer writes with source s scaled by alpha[s]: a CLT feature (l, p, f) writes
    act * W_dec[l][f, o - l] after every MLP o >= l (constant positions left out)."""
    T, P = rep.record.ids_T.numel(), sources.traced_P
    n_feat = sources.features_S3.shape[0]
    writes = [torch.zeros(T, D, dtype=torch.float64) for _ in range(N_LAYERS)]
    for s, (layer, pos, f) in enumerate(sources.features_S3.tolist()):
        for out in range(layer, N_LAYERS):
            row = torch.zeros(T, D, dtype=torch.float64)
            row[pos] = sources.acts_S[s] * clt.decoder(layer)[f, out - layer].detach()
            writes[out] = writes[out] + alpha_S[s] * row
    alpha_err = torch.zeros(N_LAYERS, T, 1, dtype=torch.float64)
    alpha_err[:, P] = alpha_S[n_feat : n_feat + N_LAYERS * P.numel()].view(N_LAYERS, P.numel(), 1)
    writes = [w + alpha_err[layer] * rep.errors[layer] for layer, w in enumerate(writes)]
    embed = alpha_S[n_feat + N_LAYERS * P.numel() :, None] * rep.record.embed_TD
    return embed[None], [w[None] for w in writes]


def test_clt_edges_equal_a_brute_force_jacobian(model, rep, clt, graph):
    sources = active_features(rep, graph.constant_positions)
    n_sources = graph.adjacency.shape[0] - graph.n_logits
    logit_read, _ = logit_readouts(model, rep, graph.logit_tokens[:2])
    late = graph.features[graph.features[:, 0] >= 2][-3:]
    feature_read, _ = feature_readouts(rep, late)
    rows = [int((graph.features == f).all(1).nonzero()) for f in late]

    def target(alpha_S, readout, k):
        embed, writes = _clt_source_writes(rep, clt, sources, alpha_S)
        out = replacement_forward(model, rep, embed, writes)
        point = out.final_BTD if int(readout.layer_R[k]) == N_LAYERS else out.mlp_in[int(readout.layer_R[k])]
        return point[0, int(readout.pos_R[k])] @ readout.vector_RD[k]

    ones = torch.ones(n_sources, dtype=torch.float64)
    cases = [(logit_read, k, n_sources + k) for k in range(2)] + [(feature_read, k, rows[k]) for k in range(3)]
    for readout, k, row in cases:
        jacobian = torch.autograd.functional.jacobian(lambda a, r=readout, k=k: target(a, r, k), ones)
        torch.testing.assert_close(graph.adjacency[row, :n_sources], jacobian, rtol=1e-9, atol=1e-12)
    # layer-0 features reach the logits through writes after every MLP, not just their own
    assert graph.features[:, 0].min() == 0


def test_clt_targets_are_the_sum_of_their_edges_plus_constants(graph):
    n = graph.adjacency.shape[0]
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(n - graph.n_logits, n)])
    reconstructed = graph.adjacency[rows].sum(1) + graph.constants[rows]
    torch.testing.assert_close(reconstructed, graph.values[rows], rtol=0, atol=1e-12)


def test_a_diagonal_clt_gives_the_per_layer_transcoders_graph(model, ids, clt):
    diagonal = copy.deepcopy(clt)
    transcoders = {}
    with torch.no_grad():
        for layer in range(N_LAYERS):
            diagonal.decoder(layer)[:, 1:] = 0
            tc = Transcoder(SaeConfig(D, F, "topk", k=K), skip=clt.cfg.skip).double()
            tc.W_enc_FD.copy_(diagonal.W_enc[layer])
            tc.b_enc.copy_(diagonal.b_enc_LF[layer])
            tc.W_dec.copy_(diagonal.decoder(layer)[:, 0])
            tc.b_dec.copy_(diagonal.b_dec_LD[layer])
            if clt.cfg.skip:
                tc.W_skip.copy_(diagonal.W_skip[layer])
            transcoders[layer] = tc.eval()
    record = record_prompt(model, ids)
    graphs = []
    for replacement_of in (diagonal, transcoders):
        rep = build_replacement(record, replacement_of)
        tokens, probs = target_logits(rep.record.logits_TV[-1])
        graphs.append(attribute(model, rep, tokens, probs, max_feature_nodes=10, batch_size=8))
    ours, theirs = graphs
    assert torch.equal(ours.features, theirs.features) and ours.n_features == 10
    for name in ("adjacency", "values", "constants", "activations"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=1e-12, msg=name)


def test_trace_takes_a_clt_whole(model, ids, clt, graph):
    traced = trace(model, ids, clt, max_feature_nodes=graph.n_features, batch_size=16)
    assert traced.logit_error < 1e-12
    torch.testing.assert_close(traced.adjacency, graph.adjacency, rtol=0, atol=1e-12)


def test_a_clt_over_the_wrong_number_of_layers_is_refused(model, ids):
    with pytest.raises(ValueError, match="spans 3 layers, the model has 4"):
        build_replacement(record_prompt(model, ids), CrossLayerTranscoder(CltConfig(3, D, F, k=K)))


def test_train_state_counts_dead_latents():
    state = CltTrainState.fresh(CrossLayerTranscoder(CltConfig(2, 8, 16, k=4)))
    state.tokens_since_fired_LF[1, :4] = 100
    assert state.dead_fraction(50) == 4 / 32

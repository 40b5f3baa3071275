"""Every pruner rejects a wrongly typed or out-of-range argument at construction, with a message
that names the argument, instead of failing (or silently misbehaving) later in training."""
import math

import pytest
import torch

from stripeconv import pruning

from conftest import FASHION_SIZE as SIZE, tiny_vgg

VAL = [(torch.randn(4, *SIZE[1:]), torch.zeros(4, dtype=torch.long))]

# the smallest valid call of each method
VALID = {
    "SWP": {},
    "L1Filter": dict(ratio=0.5),
    "L1Stripe": dict(ratio=0.5),
    "SFP": dict(ratio=0.5, epochs=2),
    "HFP": dict(ratio=0.5, epochs=2),
    "GHFP": dict(ratio=0.5, epochs=2),
    "ASFP": dict(ratio=0.5, epochs=2),
    "SRFP": dict(ratio=0.5, epochs=2),
    "ASRFP": dict(ratio=0.5, epochs=2),
    "GReg1": dict(ratio=0.5),
    "GReg2": dict(ratio=0.5),
    "IncReg": dict(ratio=0.5),
    "OrthoReg": dict(ratio=0.5, val_data=VAL, epochs=2),
    "PFP": dict(ratio=0.5),
    "LBS": dict(ratio=0.5, val_data=VAL),
    "DAIS": dict(target_flops_reduction=0.5, val_data=VAL, search_steps=4),
    "DSA": dict(target_flops_reduction=0.5, val_data=VAL, search_steps=4),
    "MetaPruning": dict(ratio=0.5, val_data=VAL),
    "ACP": dict(ratio=0.5, val_data=VAL),
    "CPMC": dict(ratio=0.5),
    "FunctionalityPruning": dict(ratio=0.5),
}

# (methods, bad keyword arguments, exception, words the message must contain)
BAD = [
    (VALID, dict(input_size="1x1x28x28"), TypeError, "input_size must be the input shape"),
    (VALID, dict(input_size=(1, 0, 28, 28)), TypeError, "input_size must be the input shape"),
    (VALID, dict(input_size=(1, 28, 28)), ValueError, "with the batch that is (1, 1, 28, 28)"),
    (["L1Filter", "SFP", "GReg1", "IncReg", "CPMC", "FunctionalityPruning"], dict(ratio="0.5"), TypeError,
     "ratio must be a number in [0.0, 1.0)"),
    (["L1Filter", "SFP", "GReg1", "IncReg"], dict(ratio=math.nan), ValueError, "ratio must be a number"),
    (["L1Filter", "SFP", "GReg1", "IncReg"], dict(ratio=True), TypeError, "ratio must be a number"),
    (["L1Filter", "SFP"], dict(ratio=None, ratios=[0.5]), TypeError, "ratios must be a dict from layer name"),
    (["L1Filter", "SFP", "CPMC"], dict(ratio=None, ratios={"features.0": "half"}), TypeError,
     "ratios['features.0']"),
    (["L1Filter", "SFP"], dict(ratio=None, ratios={0: 0.5}), TypeError, "ratios keys must be layer names"),
    (["L1Filter", "DAIS", "DSA", "CPMC"], dict(ratio=None, target_flops_reduction=1.5), ValueError,
     "target_flops_reduction"),
    (["L1Filter", "SFP", "GReg1", "CPMC"], dict(scope="model"), ValueError, "scope must be one of ('layer', 'global')"),
    (["SFP", "SWP", "IncReg"], dict(epochs=0), ValueError, "epochs must be an integer >= 1"),
    (["SFP", "SWP"], dict(epochs=2.5), TypeError, "epochs must be an integer"),
    (["SWP"], dict(alpha=-1e-5), ValueError, "alpha must be a number >= 0.0"),
    (["SWP"], dict(threshold="0.05"), TypeError, "threshold must be a number"),
    (["SWP"], dict(group_size=0), ValueError, "group_size must be an integer >= 1"),
    (["SWP"], dict(group_size=2.0), TypeError, "group_size must be an integer"),
    (["SWP"], dict(ramp=0.0), ValueError, "ramp must be a number in (0.0, 1.0]"),
    (["L1Filter", "SFP"], dict(p=0), ValueError, "p must be a number > 0.0"),
    (["SFP", "SRFP"], dict(interval=0), ValueError, "interval must be an integer >= 1"),
    (["SRFP"], dict(alpha0=1.5), ValueError, "alpha0 must be a number in [0.0, 1.0]"),
    (["GReg1", "GReg2", "IncReg"], dict(delta=0.0), ValueError, "delta must be a number > 0.0"),
    (["GReg1", "GReg2", "IncReg"], dict(ceiling=-1.0), ValueError, "ceiling must be a number > 0.0"),
    (["GReg1", "GReg2", "IncReg"], dict(interval=0), ValueError, "interval must be an integer >= 1"),
    (["GReg1", "GReg2", "IncReg"], dict(reg_steps=0), ValueError, "reg_steps must be an integer >= 1"),
    (["GReg1", "GReg2", "IncReg"], dict(reg_steps="100"), TypeError, "reg_steps must be an integer"),
    (["GReg1", "GReg2"], dict(stabilize_steps=-1), ValueError, "stabilize_steps must be an integer >= 0"),
    (["GReg2"], dict(recover=1e-4), ValueError, "recover must be a number <= 0.0"),
    (["GReg1"], dict(mag_ratio_limit=0.0), ValueError, "mag_ratio_limit must be a number > 0.0"),
    (["IncReg"], dict(u=1.0), ValueError, "u must be a number in (0.0, 1.0)"),
    (["LBS"], dict(ratio=None, delta=float("nan")), ValueError, "delta must be a number"),
    (["LBS"], dict(score_batches=0), ValueError, "score_batches must be an integer >= 1"),
    (["LBS"], dict(val_batches=1.5), TypeError, "val_batches must be an integer"),
    (["LBS"], dict(max_layer_rate=1.0), ValueError, "max_layer_rate must be a number in (0.0, 1.0)"),
    (["LBS"], dict(delta_iters=0), ValueError, "delta_iters must be an integer >= 1"),
    (["OrthoReg"], dict(rounds=3), ValueError, "rounds must be an integer in [1, 2]"),
    (["OrthoReg"], dict(strength=-1.0), ValueError, "strength must be a number >= 0.0"),
    (["OrthoReg"], dict(importance_samples=0), ValueError, "importance_samples must be an integer >= 1"),
    (["OrthoReg"], dict(max_layer_rate=1.0), ValueError, "max_layer_rate must be a number in (0.0, 1.0)"),
    (["OrthoReg"], dict(epochs=1.5), TypeError, "epochs must be an integer"),
    (["PFP", "FunctionalityPruning"], dict(samples=0), ValueError, "samples must be an integer >= 1"),
    (["PFP"], dict(samples=2.5), TypeError, "samples must be an integer"),
    (["PFP"], dict(delta_failure=0.0), ValueError, "delta_failure must be a number in (0.0, 1.0)"),
    (["PFP"], dict(c_constant=-3.0), ValueError, "c_constant must be a number > 0.0"),
    (["PFP"], dict(eps_range=(0.0, 1.0)), ValueError, "eps_range must be a number > 0.0"),
    (["PFP"], dict(eps_range=5.0), TypeError, "eps_range must be a pair"),
    (["PFP"], dict(eps_iters=0), ValueError, "eps_iters must be an integer >= 1"),
    (["PFP"], dict(sampling="top"), ValueError, "sampling must be one of ('deterministic', 'random')"),
    (["PFP", "FunctionalityPruning"], dict(seed=-1), ValueError, "seed must be an integer >= 0"),
    (["PFP", "LBS", "MetaPruning", "ACP", "FunctionalityPruning"], dict(ratio=0.5, granularity="stripe"), ValueError,
     "filters only"),
    (["MetaPruning", "ACP"], dict(ratio=None, ratios={"features.0": 0.5}), ValueError, "ratios= is not accepted"),
    (["ACP"], dict(particles=0), ValueError, "particles must be an integer >= 1"),
    (["ACP"], dict(cycles=1.5), TypeError, "cycles must be an integer"),
    (["ACP"], dict(eps=3.0), ValueError, "eps must be a number in [0.0, 2.0]"),
    (["ACP"], dict(chi=0.0), ValueError, "chi must be a number in (0.0, 1.0]"),
    (["ACP"], dict(max_vel=0.0), ValueError, "max_vel must be a number > 0.0"),
    (["ACP"], dict(momentum=1.0), ValueError, "momentum must be a number in [0.0, 1.0)"),
    (["ACP"], dict(fitness_steps=0), ValueError, "fitness_steps must be an integer >= 1"),
    (["ACP"], dict(select="l2"), ValueError, "select must be one of ('l1', 'random')"),
    (["DAIS", "DSA"], dict(search_steps=0), ValueError, "search_steps must be an integer >= 1"),
    (["DAIS"], dict(t0=1.0, t_end=2.0), ValueError, "t_end must be a number in (0.0, 1.0]"),
    (["DAIS", "DSA"], dict(alpha_lr=0), ValueError, "alpha_lr must be a number > 0.0"),
    (["DAIS"], dict(l1_weight=-1.0), ValueError, "l1_weight must be a number >= 0.0"),
    (["DAIS", "DSA"], dict(alpha_every=0), ValueError, "alpha_every must be an integer >= 1"),
    (["DSA"], dict(beta2=0.0), ValueError, "beta2 must be a number > 0.0"),
    (["DSA"], dict(floor=1.0), ValueError, "floor must be a number in [0.0, 1.0)"),
    (["DSA"], dict(keep_init=1.5), ValueError, "keep_init must be a number in [0.01, 1.0]"),
    (["DSA"], dict(rho=-1.0), ValueError, "rho must be a number > 0.0"),
    (["DSA"], dict(admm_every=0), ValueError, "admm_every must be an integer >= 1"),
    (["DSA"], dict(tolerance=1.0), ValueError, "tolerance must be a number in [0.0, 1.0)"),
    (["DSA", "CPMC"], dict(granularity="stripe"), ValueError, "channels only"),
    (["CPMC"], dict(alpha=-1.0), ValueError, "alpha must be a number >= 0.0"),
    (["CPMC"], dict(beta="1"), TypeError, "beta must be a number"),
    (["CPMC"], dict(alpha=0.0, beta=0.0, gamma=0.0), ValueError, "cannot all be 0"),
    (["CPMC"], dict(p=3), ValueError, "p must be 1 (L1 norm) or 2"),
    (["CPMC"], dict(normalization="max"), ValueError, "normalization must be one of ('layer', 'global')"),
    (["CPMC"], dict(log_costs="yes"), TypeError, "log_costs must be True or False"),
    (["CPMC"], dict(max_layer_rate=0.0), ValueError, "max_layer_rate must be a number in (0.0, 1.0]"),
    (["FunctionalityPruning"], dict(similarity=0.9), ValueError, "give either similarity= or a target"),
    (["FunctionalityPruning"], dict(ratio=None, similarity=1.5), ValueError,
     "similarity must be a number in [-1.0, 1.0]"),
    (["FunctionalityPruning"], dict(representation="weights"), ValueError,
     "representation must be one of ('response', 'activation_max')"),
    (["FunctionalityPruning"], dict(linkage="ward"), ValueError,
     "linkage must be one of ('average', 'complete', 'single')"),
    (["FunctionalityPruning"], dict(keep="largest"), ValueError, "keep must be one of ('medoid', 'strongest')"),
    (["FunctionalityPruning"], dict(am_steps=0), ValueError, "am_steps must be an integer >= 1"),
    (["FunctionalityPruning"], dict(am_lr=0.0), ValueError, "am_lr must be a number > 0.0"),
    (["FunctionalityPruning"], dict(am_decay=1.0), ValueError, "am_decay must be a number in [0.0, 1.0)"),
]

CASES = [pytest.param(method, bad, exc, words, id=f"{method}-{'-'.join(f'{k}={v!r}' for k, v in bad.items())}")
         for methods, bad, exc, words in BAD for method in methods]


@pytest.mark.parametrize("method", sorted(VALID))
def test_valid_call_constructs(method):
    pruning.METHODS[method](tiny_vgg(), SIZE, **VALID[method])


@pytest.mark.parametrize("method,bad,exc,words", CASES)
def test_bad_argument_is_named(method, bad, exc, words):
    kwargs = {**VALID[method], **bad}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    input_size = kwargs.pop("input_size", SIZE)
    with pytest.raises(exc) as info:
        pruning.METHODS[method](tiny_vgg(), input_size, **kwargs)
    assert method in str(info.value) and words in str(info.value)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="L1Filter: model must be an nn.Module, got dict"):
        pruning.L1Filter({"weight": torch.zeros(1)}, SIZE, ratio=0.5)


def test_a_compiled_model_is_refused_with_the_way_out():
    model = tiny_vgg()
    with pytest.raises(TypeError, match=r"L1Filter: model is a torch.compile wrapper; pass the module it runs"):
        pruning.L1Filter(torch.compile(model), SIZE, ratio=0.5)
    pruning.L1Filter(torch.compile(model)._orig_mod, SIZE, ratio=0.5).prune()


def test_numpy_and_tensor_sizes_still_accepted():
    np = pytest.importorskip("numpy")
    pr = pruning.L1Filter(tiny_vgg(), torch.Size(SIZE), ratio=np.float64(0.5))
    pr.prune()
    pruning.L1Filter(tiny_vgg(), torch.randn(SIZE), ratio=0.5).prune()


def test_layer_names_one_string_is_one_name():
    """``exclude="features.0"`` leaves that conv out (not the characters of its name); unknown names raise."""
    assert list(pruning.L1Filter(tiny_vgg(), SIZE, ratio=0.5, exclude="features.0").convs) == ["features.4",
                                                                                              "features.8"]
    assert list(pruning.L1Filter(tiny_vgg(), SIZE, ratio=0.5, layers="features.4").convs) == ["features.4"]
    with pytest.raises(KeyError, match=r"exclude names no module of the model: \['nolayer'\]"):
        pruning.L1Filter(tiny_vgg(), SIZE, ratio=0.5, exclude=["nolayer"])
    with pytest.raises(TypeError, match="layers must be module names"):
        pruning.L1Filter(tiny_vgg(), SIZE, ratio=0.5, layers=[0])


def test_a_model_with_stripe_layers_is_refused():
    """Pruning an exported (StripeConv2d) model again would trace a wrong dependency graph (its channels
    routed around the StripeConv2d layers) and claim FLOPs that export cannot remove: a clear error."""
    from stripeconv.pruning.graph import ChannelGraph

    exported = pruning.L1Stripe(tiny_vgg(), SIZE, ratio=0.5)
    exported.prune()
    model = exported.export()
    with pytest.raises(ValueError, match=r"L1Filter: the model already has StripeConv2d layers \(features.0"):
        pruning.L1Filter(model, SIZE, ratio=0.3)
    with pytest.raises(ValueError, match="does not see through StripeConv2d layers"):
        ChannelGraph(model, torch.zeros(SIZE))

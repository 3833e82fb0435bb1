"""utils.benchmarking.ablations' inference-only variants: each changes a copy of the finished
model at test time, never the model itself, and the correction switched off is the prior-only
model of the correction check."""
import torch

from models.diffmic3d import DiffMIC3D, ModelConfig
from utils.benchmarking.ablations import INFERENCE, NO_CORRECTION, inference_names, inference_variants
from helpers import SHAPE


def _model(prior_residual=True):
    torch.manual_seed(0)
    config = ModelConfig.tiny(2, input_shape=SHAPE)
    config.denoiser.prior_residual = prior_residual
    if not prior_residual:
        config.diffusion.parameterization = "y0"
    model = DiffMIC3D(config).eval()
    torch.nn.init.normal_(model.denoiser.head.out.weight, std=0.1)  # a trained correction
    return model


def test_the_correction_switched_off_zeroes_a_copy_of_the_last_layer_only():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def predict(net, guidance, **kw):
        seen.append((net, guidance, kw))
        return torch.zeros(3, 2).numpy()

    out = inference_variants(model, ["members"], predict, [NO_CORRECTION])
    assert list(out) == [NO_CORRECTION] and len(seen) == 1
    net, guidance, kw = seen[0]
    assert net is not model and guidance == ["members"] and kw == {}  # all members, the model's own sampler
    assert all((p == 0).all() for p in net.denoiser.head.out.parameters())
    assert model.denoiser.head.out.weight.abs().sum() > 0
    rest = {k: v for k, v in net.state_dict().items() if not k.startswith("denoiser.head.out.")}
    assert all(torch.equal(v, before[k]) for k, v in rest.items())  # nothing else differs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched


def test_a_denoiser_without_a_correction_has_no_such_variant():
    assert inference_names(_model()) == list(INFERENCE)
    assert inference_names(_model(prior_residual=False)) == [v for v in INFERENCE if v != NO_CORRECTION]

import pytest
import torch

from efficientad.errors import EfficientADError
from efficientad.networks import autoencoder, pdn, pdn_output_side


@pytest.mark.parametrize("size", ["s", "m"])
@pytest.mark.parametrize("shape,expected", [((256, 256), (56, 56)), ((320, 320), (72, 72)), ((256, 384), (56, 88))])
def test_pdn_output_shapes_without_padding(size, shape, expected):
    with torch.no_grad():
        out = pdn(size, 768)(torch.zeros(1, 3, *shape))
    assert out.shape == (1, 768, *expected)
    assert (pdn_output_side(size, shape[0]), pdn_output_side(size, shape[1])) == expected


@pytest.mark.parametrize("size", ["s", "m"])
def test_pdn_with_padding_gives_the_pretraining_grid(size):
    with torch.no_grad():
        out = pdn(size, padding=True)(torch.zeros(1, 3, 256, 256))
    assert out.shape == (1, 384, 64, 64)
    assert pdn_output_side(size, 256, padding=True) == 64


def test_pdn_keys_match_the_reference_layout():
    assert [k for k in pdn("s").state_dict() if k.endswith("weight")] == ["0.weight", "3.weight", "6.weight", "8.weight"]
    assert [k for k in pdn("m").state_dict() if k.endswith("weight")] == [f"{i}.weight" for i in (0, 3, 6, 8, 10, 12)]


def test_pdn_small_has_the_papers_layers():
    convs = [m for m in pdn("s") if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(3, 128, 4), (128, 256, 4), (256, 256, 3), (256, 384, 4)]


@pytest.mark.parametrize("shape", [(256, 256), (320, 320), (512, 512), (256, 384)])
def test_autoencoder_matches_the_student_grid(shape):
    net = autoencoder(shape)
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 3, *shape))
    assert out.shape == (1, 384, pdn_output_side("s", shape[0]), pdn_output_side("s", shape[1]))


def test_autoencoder_decoder_follows_the_paper_at_256():
    upsample_sizes = [m.size for m in autoencoder((256, 256)) if isinstance(m, torch.nn.Upsample)]
    assert upsample_sizes == [(3, 3), (8, 8), (15, 15), (32, 32), (63, 63), (127, 127), (56, 56)]
    dropouts = [m.p for m in autoencoder((256, 256)) if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.2] * 6


@pytest.mark.parametrize("shape", [(128, 128), (255, 256), (64, 512)])
def test_too_small_images_are_refused_clearly(shape):
    with pytest.raises(EfficientADError, match="at least 256"):
        autoencoder(shape)


def test_unknown_model_size():
    with pytest.raises(ValueError, match="model_size"):
        pdn("xl")

"""CLIP-skip embeddings against two independent computations: the hidden state of a manual forward with
output_hidden_states, and a text encoder truncated to the used layers (whose last_hidden_state applies the
final layer norm itself)."""

import copy

import pytest
import torch

from chain.config import TinyModelConfig
from chain.models import make_tiny_base_model
from chain.text import encode_prompts, tokenize


@pytest.fixture(scope="module")
def model():
    return make_tiny_base_model(TinyModelConfig(text_layers=4), resolution=16)


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_matches_truncated_encoder(model, clip_skip):
    te, tok = model.text_encoder, model.tokenizer
    prompts = ["a red square", ""]
    got = encode_prompts(te, tok, prompts, clip_skip=clip_skip, max_length=77)
    ids = tokenize(tok, prompts, 77)
    truncated = copy.deepcopy(te)
    keep = te.config.num_hidden_layers - (clip_skip - 1)
    truncated.encoder.layers = truncated.encoder.layers[:keep]
    with torch.no_grad():
        want = truncated(ids).last_hidden_state
        hidden = te(ids, output_hidden_states=True).hidden_states[-clip_skip]
        manual = torch.nn.functional.layer_norm(
            hidden, hidden.shape[-1:], te.final_layer_norm.weight, te.final_layer_norm.bias, te.final_layer_norm.eps
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)


def test_skip_changes_embedding(model):
    e1 = encode_prompts(model.text_encoder, model.tokenizer, ["x"], clip_skip=1, max_length=77)
    e2 = encode_prompts(model.text_encoder, model.tokenizer, ["x"], clip_skip=2, max_length=77)
    assert not torch.allclose(e1, e2)

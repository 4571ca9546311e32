"""Building the models: tiny presets sized to the tokenizer, HF save/load round trips, the
scalar head (value/reward) reading the right positions of left-padded batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_ray.config.ppo import ModelSpec, TokenizerConfig
from rlhf_ray.data.tokenization import build_tokenizer
from rlhf_ray.models import ScalarHeadModel, build_causal_lm, build_scalar_model
from rlhf_ray.models.logprobs import position_ids_from_mask

PRESETS = ["gpt2-tiny", "llama-tiny"]
TEXTS = ["Hello there, how are you?", "a", "The quick brown fox", "ok then"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


def spec(**kw) -> ModelSpec:
    return ModelSpec(**{"hidden_size": 32, "num_layers": 2, "num_heads": 4, **kw})


def left_batch(tok, texts=TEXTS):
    return tok.encode_batch_left_padded(texts, max_length=64)


def right_batch(tok, texts=TEXTS):
    """The same texts padded on the right (what a plain HF classifier expects)."""
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits


# ------------------------------------------------------------------------- causal LM


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_sized_to_the_tokenizer_with_explicit_special_ids(tok, preset):
    model = build_causal_lm(spec(preset=preset), tok)
    assert model.get_input_embeddings().num_embeddings == tok.vocab_size
    assert model.get_output_embeddings().out_features == tok.vocab_size
    assert model.config.pad_token_id == tok.pad_id
    assert model.config.eos_token_id == tok.eos_id
    assert model.config.pad_token_id != model.config.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_id
    assert model.generation_config.eos_token_id == tok.eos_id
    ids, mask = left_batch(tok)
    assert _logits(model, ids, mask).shape == (*ids.shape, tok.vocab_size)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_follows_the_spec_sizes(tok, preset):
    model = build_causal_lm(spec(preset=preset, hidden_size=48, num_layers=3, num_heads=6), tok)
    assert model.get_input_embeddings().embedding_dim == 48
    assert model.config.num_hidden_layers == 3
    assert model.config.num_attention_heads == 6


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("build", [build_causal_lm, build_scalar_model])
def test_dropout_is_off_everywhere(tok, preset, build):
    model = build(spec(preset=preset), tok)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            assert module.p == 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            assert module.attention_dropout == 0.0
    # Even in train mode, two forwards agree (sampling, old and new logprobs must match).
    model.train()
    ids, mask = left_batch(tok)
    torch.manual_seed(1)
    first = model(input_ids=ids, attention_mask=mask)
    torch.manual_seed(2)
    second = model(input_ids=ids, attention_mask=mask)
    first = getattr(first, "logits", first)
    second = getattr(second, "logits", second)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_causal_lm_save_and_hf_load_give_identical_logits(tok, tmp_path, preset):
    model = build_causal_lm(spec(preset=preset), tok)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = left_batch(tok)
    torch.testing.assert_close(
        _logits(loaded, ids, mask), _logits(model, ids, mask), rtol=0, atol=0
    )
    rebuilt = build_causal_lm(spec(preset=preset, path=str(tmp_path)), tok)
    torch.testing.assert_close(
        _logits(rebuilt, ids, mask), _logits(model, ids, mask), rtol=0, atol=0
    )


def test_bfloat16_dtype_is_applied(tok):
    model = build_causal_lm(spec(dtype="bfloat16"), tok)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("build", [build_causal_lm, build_scalar_model])
def test_init_seed_makes_weights_reproducible(tok, build):
    a = build(spec(init_seed=3), tok).state_dict()
    b = build(spec(init_seed=3), tok).state_dict()
    c = build(spec(init_seed=4), tok).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[name], c[name]) for name in a if a[name].is_floating_point())


def test_building_a_preset_leaves_the_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_causal_lm(spec(), tok)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------- scalar head


def _scores_by_hand(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = []
    for row in range(mask.shape[0]):
        real = mask[row].nonzero().flatten()
        out.append(values[row, real[-1]])
    return torch.stack(out)


@pytest.mark.parametrize("preset", PRESETS)
def test_scalar_forward_gives_one_value_per_token(tok, preset):
    model = build_scalar_model(spec(preset=preset), tok)
    ids, mask = left_batch(tok)
    with torch.no_grad():
        values = model(ids, mask)
    assert values.shape == ids.shape
    assert values.dtype == torch.float32
    assert values.std() > 0  # not a constant head


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch", [left_batch, right_batch], ids=["left", "right"])
def test_sequence_scores_read_the_last_real_token(tok, preset, batch):
    model = build_scalar_model(spec(preset=preset), tok)
    ids, mask = batch(tok)
    with torch.no_grad():
        values = model(ids, mask)
        scores = model.sequence_scores(ids, mask)
    assert scores.shape == (len(TEXTS),)
    torch.testing.assert_close(scores, _scores_by_hand(values, mask), rtol=0, atol=0)
    if batch is right_batch:  # the last column is a pad for the shorter rows: not read
        assert not torch.allclose(scores, values[:, -1])


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padding_does_not_change_values(tok, preset):
    model = build_scalar_model(spec(preset=preset), tok)
    ids, mask = left_batch(tok)
    with torch.no_grad():
        values = model(ids, mask)
        for row, text in enumerate(TEXTS):
            alone = torch.tensor([tok.encode(text)])
            expected = model(alone, torch.ones_like(alone))[0]
            torch.testing.assert_close(
                values[row, mask[row].bool()], expected, rtol=1e-5, atol=1e-5
            )
    assert (mask == 0).any()  # the batch really was padded


@pytest.mark.parametrize("preset", PRESETS)
def test_scalar_model_saves_as_a_standard_hf_classifier(tok, tmp_path, preset):
    model = build_scalar_model(spec(preset=preset, init_seed=5), tok)
    model.save_pretrained(str(tmp_path))

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert hf.config.num_labels == 1
    ids, mask = right_batch(tok)  # HF's classifier picks the last non-pad token itself
    with torch.no_grad():
        hf_scores = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = model.sequence_scores(ids, mask)
    torch.testing.assert_close(hf_scores, ours, rtol=1e-5, atol=1e-5)

    reloaded = build_scalar_model(spec(preset=preset, path=str(tmp_path)), tok)
    ids, mask = left_batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.sequence_scores(ids, mask), model.sequence_scores(ids, mask), rtol=0, atol=0
        )


def test_scalar_model_saves_a_given_prefixed_state_dict(tok, tmp_path):
    """Checkpoints pass ``model.state_dict()`` (keys ``seq_cls.*``) from a training engine."""
    model = build_scalar_model(spec(), tok)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(k.startswith("seq_cls.") for k in state)
    head_key = next(k for k in state if k.endswith("score.weight"))
    state[head_key] *= 2.0  # the head has no bias: scores double
    model.save_pretrained(str(tmp_path), state_dict=state)

    reloaded = build_scalar_model(spec(path=str(tmp_path)), tok)
    ids, mask = left_batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.sequence_scores(ids, mask),
            2.0 * model.sequence_scores(ids, mask),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("preset", PRESETS)
def test_scalar_model_from_a_causal_lm_checkpoint_keeps_its_backbone(tok, tmp_path, preset):
    lm = build_causal_lm(spec(preset=preset, init_seed=2), tok)
    lm.save_pretrained(tmp_path)
    scalar = build_scalar_model(spec(preset=preset, path=str(tmp_path)), tok)
    ids, mask = left_batch(tok)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    with torch.no_grad():
        torch.testing.assert_close(
            scalar.backbone(**kwargs).last_hidden_state,
            lm.base_model(**kwargs).last_hidden_state,
            rtol=0,
            atol=0,
        )
        assert scalar(ids, mask).shape == ids.shape


def test_scalar_head_model_rejects_a_model_without_a_head(tok):
    with pytest.raises(ValueError, match="score"):
        ScalarHeadModel(build_causal_lm(spec(), tok))


def test_rows_for_added_tokens_are_the_same_in_every_process(tok, tmp_path):
    """A pretrained model whose vocabulary lacks our added pad token: every builder (each role,
    in its own process and RNG state) gets the same new row, the mean of the old rows, so the
    policy, reference and critic agree and the export does not depend on an RNG."""
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaConfig(
        vocab_size=tok.vocab_size - 1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(small).save_pretrained(tmp_path)
    spec = ModelSpec(path=str(tmp_path))
    built = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        built.append(build_causal_lm(spec, tok).get_input_embeddings().weight.detach().clone())
    old = built[0][:-1]
    assert built[0].shape[0] == tok.vocab_size
    assert torch.equal(built[0], built[1])
    assert torch.allclose(built[0][-1], old.mean(0))

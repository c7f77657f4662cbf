"""liere.integrations.transformers against Hugging Face transformers itself (tiny random decoders, no download)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install 'liere[hf]')")

from liere.integrations.transformers import from_pretrained, liere_transformers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    initializer_range=0.1,  # larger weights than the default: logits that depend clearly on positions
)  # fmt: skip
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SPECS = ["rope", "liere8", "rope-mixed", "comrope-ap8", "string-cayley"]


def tiny_model(arch: str = "llama", seed: int = 0, **overrides: object) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(arch, **(TINY | overrides))
    torch.manual_seed(seed)
    return getattr(transformers, ARCHS[arch])(config).eval()


def adapted(model: torch.nn.Module, spec: str | None, seed: int = 1) -> torch.nn.Module:
    """A copy of ``model`` adapted with ``spec``, its learned encoding moved away from its (RoPE-like) start."""
    model = copy.deepcopy(model)
    pe = liere_transformers(model, spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pe.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def with_rope(model: torch.nn.Module, **params: object) -> torch.nn.Module:
    """``model`` whose config's ``rope_parameters`` are updated with ``params`` (its modules unchanged)."""
    model.config.rope_parameters = {**model.config.rope_parameters, **params}
    return model


def left_padded(batch: int = 3, length: int = 9, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(batch, length)`` and their attention mask, row ``i`` left-padded by ``2 i`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(batch):
        ids[row, : 2 * row], mask[row, : 2 * row] = 0, 0
    return ids, mask


ROPE_TYPES = {  # rope_parameters beyond rope_theta; positions up to 40 pass every original length (16)
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},  # with max_position_embeddings=16: rescaled past 16 positions
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {
        "short_factor": [1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0],
        "long_factor": [1.0, 1.3, 1.7, 2.2, 3.0, 4.5, 6.0, 8.0],
        "original_max_position_embeddings": 16,
    },
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def own_rope_model(arch: str, rope_type: str) -> torch.nn.Module:
    params = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_TYPES[rope_type]}
    return tiny_model(arch, rope_parameters=params, max_position_embeddings=16 if rope_type == "dynamic" else 64)


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_own_rope_reproduces_logits(arch: str, rope_type: str) -> None:
    """spec=None: liere computes the config's RoPE (rope_parameters included); logits equal transformers' to 1e-5,
    for short and long inputs, left-padded, and with explicit position_ids."""
    ids = torch.randint(1, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    pos = torch.tensor([[3, 4, 5, 9, 10, 11, 20, 21, 22]])
    for kwargs in [
        dict(input_ids=ids[:, :12]),
        dict(input_ids=ids, attention_mask=mask),
        dict(input_ids=ids[:1, :9], position_ids=pos),
    ]:
        model = own_rope_model(arch, rope_type)  # fresh: transformers' dynamic and longrope RoPE keep state
        ours = adapted(model, None)
        with torch.no_grad():
            diff = (ours(**kwargs).logits - model(**kwargs).logits).abs().max().item()
        print(f"{arch} {rope_type} {tuple(kwargs['input_ids'].shape)}: max logit difference {diff:.2e}")
        assert diff <= 1e-5


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_own_rope_generates_like_transformers(rope_type: str) -> None:
    """Greedy generate (KV cache) from a left-padded 9-token prompt to 49 tokens, past every original length."""
    model = own_rope_model("llama", rope_type)
    ours = adapted(model, None)
    ids, mask = left_padded()
    new = dict(max_new_tokens=40, do_sample=False, attention_mask=mask)
    assert torch.equal(ours.generate(ids, **new), model.generate(ids, **new))


@pytest.mark.parametrize("spec", SPECS)
def test_cached_generate_equals_uncached(spec: str) -> None:
    """Greedy generate with transformers' KV cache equals use_cache=False, 40 tokens past left-padded prompts."""
    model = adapted(tiny_model("qwen2"), spec)
    ids, mask = left_padded()
    new = dict(max_new_tokens=40, do_sample=False, attention_mask=mask)
    cached = model.generate(ids, **new)
    assert cached.shape == (3, 49)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **new))
    full_mask = torch.cat([mask, torch.ones(3, 40, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(1) - 1).masked_fill(full_mask == 0, 1)  # generate's positions for left padding
    with torch.no_grad():  # and one cached step's logits equal a full forward's row
        full = model(cached, attention_mask=full_mask, position_ids=pos).logits
        prompt = model(ids, attention_mask=mask, position_ids=pos[:, :9], use_cache=True)
        step = model(cached[:, 9:10], attention_mask=full_mask[:, :10], position_ids=pos[:, 9:10], cache=prompt.cache)
    torch.testing.assert_close(step.logits[:, 0], full[:, 9], atol=1e-5, rtol=1e-5)


def test_grouped_heads_share_their_kv_head_rotation() -> None:
    """Per-head encodings learn one rotation per key/value head (2 here), shared by its 2 query heads; with one key/
    value head (MQA) too."""
    model = tiny_model("mistral", num_key_value_heads=1)
    pe = liere_transformers(model, "liere8")
    assert pe(torch.arange(5.0)[None, :, None]).blocks.shape[2] == 1
    model = tiny_model("llama")
    pe = liere_transformers(model, "liere8")
    assert pe(torch.arange(5.0)[None, :, None]).blocks.shape[2] == 2
    ids, mask = left_padded()
    new = dict(max_new_tokens=20, do_sample=False, attention_mask=mask)
    assert torch.equal(model.generate(ids, **new), model.generate(ids, use_cache=False, **new))


@pytest.mark.parametrize("spec", ["liere8", "rope-mixed", "comrope-ap8"])
def test_training_reaches_every_encoding_parameter(spec: str) -> None:
    model = tiny_model("llama").train()
    pe = liere_transformers(model, spec)
    ids, _ = left_padded()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {name: p.detach().clone() for name, p in pe.named_parameters()}
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        for name, p in pe.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    assert all(not torch.equal(before[name], p) for name, p in pe.named_parameters())


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    """Checkpointed layers are recomputed in the backward, outside the forward: the rotations travel with their
    position_embeddings, so the gradients equal those of a plain backward."""
    ids, _ = left_padded()
    grads = []
    for checkpointing in (False, True):
        model = adapted(tiny_model("llama"), "liere8").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_a_layer_alone_needs_the_models_positions() -> None:
    model = adapted(tiny_model("llama"), "liere8")
    x = torch.randn(1, 5, TINY["hidden_size"])
    with pytest.raises(RuntimeError, match="position_embeddings must come from the adapted model's rotary_emb"):
        model.model.layers[0].self_attn(x, position_embeddings=(torch.ones(1, 5, 16), torch.zeros(1, 5, 16)))


@pytest.mark.parametrize("spec", [None, "liere8"])
def test_bf16_autocast_follows_fp32(spec: str | None) -> None:
    """Under bf16 autocast the logits are bf16 and near fp32; with the model's own RoPE they are transformers'
    bf16 logits, to a small part of bf16's own error."""
    model = tiny_model("llama")
    ours = adapted(model, spec)
    ids, mask = left_padded()
    with torch.no_grad():
        reference = ours(ids, attention_mask=mask).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(ids, attention_mask=mask).logits
            theirs = model(ids, attention_mask=mask).logits
    assert low.dtype == torch.bfloat16
    error = (low.float() - reference).abs().max()
    assert error < 0.05 * reference.abs().max()
    if spec is None:
        assert (low.float() - theirs.float()).abs().max() <= 0.25 * error


@pytest.mark.parametrize("spec", [None, "liere8", "rope-mixed"])
def test_save_pretrained_then_from_pretrained_restores_the_encoding(spec: str, tmp_path) -> None:
    model = adapted(tiny_model("qwen2"), spec)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    ids, mask = left_padded()
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert loaded.config.liere == {"spec": spec, "options": {}}


def test_from_pretrained_refuses_a_plain_model(tmp_path) -> None:
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no liere entry"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("make", "spec", "pattern"),
    [
        (lambda: tiny_model("llama"), "axial-rope", "encodes 2 or 3D positions; a decoder needs a 1D one"),
        (lambda: tiny_model("llama"), "liere8:num_axes=2", "is a 2D encoding"),
        (lambda: tiny_model("llama"), "sincos", "additive"),
        (lambda: with_rope(tiny_model("llama"), rope_type="proportional"), None, "rope_type 'proportional'"),
        (lambda: with_rope(tiny_model("llama"), partial_rotary_factor=0.5), None, "partial_rotary_factor"),
        (lambda: tiny_model("llama"), "nonsense", "unknown encoding"),
    ],
)
def test_bad_input_raises_before_modifying(make, spec: str | None, pattern: str) -> None:
    model = make()
    state = copy.deepcopy(model.state_dict())
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=pattern):
        liere_transformers(model, spec)
    assert [type(m) for m in model.modules()] == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.config, "liere")


def test_adapting_twice_is_refused() -> None:
    model = adapted(tiny_model("llama"), "liere8")
    with pytest.raises(ValueError, match="already adapted"):
        liere_transformers(model, "rope")


def test_unknown_architecture_is_named() -> None:
    config = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\) is not supported.*llama, mistral"):
        liere_transformers(transformers.GPT2LMHeadModel(config))
    qwen3 = transformers.Qwen3Config(**TINY, head_dim=16)  # q/k norm between q_proj and the rotation
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        liere_transformers(transformers.Qwen3ForCausalLM(qwen3))

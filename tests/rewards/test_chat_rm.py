import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

from mgs_megatron.data.toy import build_toy_tokenizer
from mgs_megatron.rewards import RewardInput, build_reward
from mgs_megatron.rewards.chat_rm import RewardModelReward


@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer()


def _save_model(path, tok, arch, pad_in_tokenizer=True):
    torch.manual_seed(0)
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, num_labels=1, max_position_embeddings=256)
    if arch == "qwen2":
        model = Qwen2ForSequenceClassification(Qwen2Config(**kw, pad_token_id=tok.pad_token_id))
    else:
        model = LlamaForSequenceClassification(LlamaConfig(**kw))
    model.save_pretrained(str(path))
    if not pad_in_tokenizer:
        tok = build_toy_tokenizer()
        tok.pad_token = None
    tok.save_pretrained(str(path))
    return path


ITEMS = [RewardInput("Say hello to Ana.", "Hello, Ana!"),
         RewardInput([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about tea."}],
                     "Tea is a warm drink made from leaves, and many people enjoy it every morning."),
         RewardInput("Thank Ben for the bread.", "no."),
         RewardInput("Ask Eva about stars.", "Eva, what do you think about the stars tonight?")]


@pytest.mark.parametrize("arch,pad", [("qwen2", True), ("llama", False)])
def test_batched_equals_unbatched(tmp_path, tok, arch, pad):
    path = _save_model(tmp_path / arch, tok, arch, pad_in_tokenizer=pad)
    rm = build_reward("chat", model_path=str(path), batch_size=4)
    assert isinstance(rm, RewardModelReward)
    batched = [o.score for o in rm.score_batch(ITEMS)]
    single = [rm.score_batch([it])[0].score for it in ITEMS]
    assert batched == pytest.approx(single, abs=1e-5)
    # right padding is really exercised: lengths differ within the batch
    lens = {len(rm.tok(t, add_special_tokens=False)["input_ids"]) for t in rm.texts(ITEMS)}
    assert len(lens) > 1
    # the score is read at the last real token: appending pads must not change it
    rm2 = RewardModelReward(str(path), batch_size=2)
    assert [o.score for o in rm2.score_batch(ITEMS)] == pytest.approx(batched, abs=1e-5)


def test_vllm_backend_is_a_documented_hook(tmp_path):
    with pytest.raises(NotImplementedError, match="pooling"):
        RewardModelReward(str(tmp_path), backend="vllm")


def test_offload_scores_the_same_and_keeps_the_model_on_the_host(tmp_path, tok, monkeypatch):
    """offload=True: the model lives on the CPU and visits `device` only while it scores (here the move is recorded:
    there is no GPU on this machine)."""
    path = _save_model(tmp_path / "rm", tok, "qwen2")
    resident = RewardModelReward(str(path), batch_size=2)
    offloaded = RewardModelReward(str(path), batch_size=2, offload=True, device="cpu")
    moves = []
    to = type(offloaded.model).to

    def recording_to(model, *args, **kwargs):
        moves.append(str(args[0]) if args else str(kwargs.get("device")))
        return to(model, *args, **kwargs)

    monkeypatch.setattr(type(offloaded.model), "to", recording_to)
    assert [o.score for o in offloaded.score_batch(ITEMS)] == [o.score for o in resident.score_batch(ITEMS)]
    assert moves == ["cpu", "cpu"] and next(offloaded.model.parameters()).device.type == "cpu"

"""Drop-in for the models Trainer trains: the update stays unbiased on language models with tied embeddings, seq2seq,
token-level losses with varying label counts, QA, multiple choice, weighted, custom and in-batch contrastive losses,
BatchNorm trunks, PEFT, gradient checkpointing, `model_init` and the Trainer family through the mixin; models without
a head to sample at train exactly as `Trainer`.

Each z-test (`test_unbiased.loop_z_test`) runs the trainer at lr 0 on one fixed batch and compares its updates with
the gradient of the same trainer at control_fraction=1 (bit-identical to the base class's); `verify_unbiased` checks
the same estimator on one forward, with many draws.
"""

from dataclasses import dataclass

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ResNetConfig,
    ResNetForImageClassification,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

import lgp_hf.predictor
from lgp_hf import PredictedGradientArguments, PredictedGradientMixin, PredictedGradientSettings, PredictedGradientTrainer, verify_unbiased
from conftest import image_dataset, tiny_vit
from test_unbiased import loop_z_test

BATCH, LENGTH, VOCAB = 8, 8, 64


def tokens(seed=0, vocab=VOCAB, shape=(BATCH, LENGTH)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def padded_labels(ids, seed=1, empty=0):
    """Labels with a different number of -100 (padding) per example; the first `empty` examples have none left."""
    labels = ids.clone()
    lengths = torch.randint(2, ids.shape[1] + 1, (ids.shape[0],), generator=torch.Generator().manual_seed(seed))
    lengths[:empty] = 0
    labels[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = -100
    return labels


def as_dataset(**columns):
    return Dataset.from_dict({k: v.numpy() for k, v in columns.items()}).with_format("torch")


def gpt2(tie=True):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config)


def llama(tie, vocab=32000):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                               dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0))


def bart():
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2))


def bert(cls, **config):
    torch.manual_seed(0)
    return cls(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                          max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config))


def lm_data(seed=0, vocab=VOCAB):
    ids = tokens(seed, vocab)
    return as_dataset(input_ids=ids, labels=padded_labels(ids))


def seq2seq_data():
    return as_dataset(input_ids=tokens(0), labels=padded_labels(tokens(1)))


FAMILIES = {
    "gpt2-lm-tied": (gpt2, lm_data),
    "llama-32k-tied": (lambda: llama(tie=True), lambda: lm_data(vocab=32000)),
    "llama-32k-untied": (lambda: llama(tie=False), lambda: lm_data(vocab=32000)),
    "t5-seq2seq": (t5, seq2seq_data),
    "bart-seq2seq": (bart, seq2seq_data),
    # token classification: varying label counts, and two examples without any labelled token
    "bert-token-classification": (
        lambda: bert(BertForTokenClassification, num_labels=3),
        lambda: as_dataset(input_ids=tokens(0), labels=padded_labels(tokens(2, vocab=3) - 1, empty=2)),
    ),
    "bert-question-answering": (
        lambda: bert(BertForQuestionAnswering),
        lambda: as_dataset(input_ids=tokens(0), start_positions=tokens(3, LENGTH, (BATCH,)), end_positions=tokens(4, LENGTH, (BATCH,))),
    ),
    "bert-multiple-choice": (
        lambda: bert(BertForMultipleChoice),
        lambda: as_dataset(input_ids=tokens(0, shape=(BATCH, 2, LENGTH)), labels=tokens(5, 2, (BATCH,)) - 1),
    ),
}




def tiny_resnet():
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3))


FAMILIES["resnet-batchnorm"] = (tiny_resnet, lambda: image_dataset(BATCH, num_labels=3, image_size=16))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_update_is_unbiased_on_every_family(family, tmp_path):
    model_factory, dataset_factory = FAMILIES[family]
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, steps=200, control_fraction=0.5)
    assert report.passed, f"{family}: {report}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_verify_unbiased_passes_on_every_family(family, tmp_path):
    model_factory, dataset_factory = FAMILIES[family]
    dataset = dataset_factory()
    args = PredictedGradientArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=BATCH, control_fraction=0.5)
    trainer = PredictedGradientTrainer(model=model_factory(), args=args, train_dataset=dataset)
    report = verify_unbiased(trainer, draws=48, verbose=False)
    assert report.passed, f"{family}: {report}"


def fitted_predictor_is_unbiased(trainer):
    """After a run with the predictor: its map and coefficients are fitted (where the trunk has linear layers in
    blocks) and `verify_unbiased` passes with them."""
    predictor = trainer.predictor
    if predictor.layers:
        assert any(c is not None and c.abs().sum() > 0 for c in predictor.correlations)
        assert (predictor.coefficients() != 0).any()
    report = verify_unbiased(trainer, draws=48, verbose=False)
    assert report.passed, report


@pytest.mark.parametrize("family", list(FAMILIES))
def test_update_with_the_predictor_is_unbiased_on_every_family(family, tmp_path):
    """The difference estimator (gradient_predictor="linear"), its map fitted from the first steps on."""
    model_factory, dataset_factory = FAMILIES[family]
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, steps=200, control_fraction=0.5, gradient_predictor="linear",
                         predictor_signal_dims=4, after=fitted_predictor_is_unbiased)
    assert report.passed, f"{family}: {report}"


def test_z_test_detects_a_predictor_term_that_is_not_centred(tmp_path, monkeypatch):
    """sum over the rows not drawn of p_i (instead of sum_i (1 - w_i) p_i) has mean sum_i (1 - pi_i) p_i: a bias."""
    def undrawn_only(prediction_map, signals, sums, weights):
        return prediction_map @ (((weights == 0).to(signals)[:, None] * signals).mT @ sums)

    monkeypatch.setattr(lgp_hf.predictor, "predicted_sum", undrawn_only)
    report = loop_z_test(tiny_vit, image_dataset(BATCH), tmp_path, steps=100, control_fraction=0.5, gradient_predictor="linear",
                         predictor_signal_dims=4)
    assert not report.passed, report


def test_rows_without_labelled_tokens_contribute_zero_not_nan(tmp_path):
    """Half the examples have no labelled token: a zero gradient at the boundary (score 0)."""
    dataset = as_dataset(input_ids=tokens(0), labels=padded_labels(tokens(2, vocab=3) - 1, empty=4))
    report = loop_z_test(lambda: bert(BertForTokenClassification, num_labels=3), dataset, tmp_path, steps=120, control_fraction=0.125)
    assert report.passed, report  # a NaN would make the z-scores NaN


# ---------------------------------------------------------------------------------------------- custom losses


class PoppingLossTrainer(PredictedGradientTrainer):
    """The transformers docs' pattern: pop the labels, compute a loss of one's own (a plain per-example mean)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = nn.functional.cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


class ClassWeightedLossTrainer(PredictedGradientTrainer):
    """A per-example weighted mean: cross-entropy with class weights (sum_i w_yi l_i / sum_i w_yi), the case a
    loss split over examples got wrong."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weights = torch.tensor([1.0, 5.0, 0.2], device=outputs.logits.device)
        loss = nn.functional.cross_entropy(outputs.logits, labels, weight=weights)
        return (loss, outputs) if return_outputs else loss


def summed_cross_entropy(outputs, labels, num_items_in_batch=None):
    return nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize(
    "case",
    ["compute_loss_override", "class_weighted_loss", "compute_loss_func", "label_smoothing_classifier", "label_smoothing_lm"],
)
def test_custom_losses_are_unbiased(case, tmp_path):
    vit_data = image_dataset(BATCH)
    settings = {
        "compute_loss_override": dict(model_factory=tiny_vit, dataset=vit_data, trainer_class=PoppingLossTrainer),
        "class_weighted_loss": dict(model_factory=tiny_vit, dataset=vit_data, trainer_class=ClassWeightedLossTrainer),
        "compute_loss_func": dict(model_factory=tiny_vit, dataset=vit_data, trainer_kwargs={"compute_loss_func": summed_cross_entropy}),
        "label_smoothing_classifier": dict(model_factory=tiny_vit, dataset=vit_data, args_kwargs={"label_smoothing_factor": 0.1}),
        "label_smoothing_lm": dict(model_factory=gpt2, dataset=lm_data(), args_kwargs={"label_smoothing_factor": 0.1}),
    }[case]
    report = loop_z_test(tmp_path=tmp_path, steps=200, control_fraction=0.5, **settings)
    assert report.passed, f"{case}: {report}"


class PairEncoder(nn.Module):
    """Two views of each example through one BERT encoder and a projection `head`, scored against every other
    example of the batch: an in-batch contrastive (InfoNCE) loss, where the loss of a row depends on all rows."""

    def __init__(self):
        super().__init__()
        self.encoder = bert(BertModel)
        self.head = nn.Linear(16, 8)

    def forward(self, input_ids, other_ids):
        pooled = self.encoder(input_ids=torch.cat([input_ids, other_ids])).last_hidden_state[:, 0]
        first, second = nn.functional.normalize(self.head(pooled), dim=-1).chunk(2)
        logits = first @ second.T / 0.1
        targets = torch.arange(len(first), device=logits.device)
        return {"loss": nn.functional.cross_entropy(logits, targets), "logits": logits}


def test_in_batch_contrastive_loss_is_unbiased(tmp_path):
    dataset = as_dataset(input_ids=tokens(0), other_ids=tokens(7))
    report = loop_z_test(PairEncoder, dataset, tmp_path, steps=200, control_fraction=0.5, args_kwargs={"label_names": []})
    assert report.passed, report


# ---------------------------------------------------------------------------------------------- PEFT


def lora(model_factory, **config):
    peft = pytest.importorskip("peft")

    def factory():
        return peft.get_peft_model(model_factory(), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, **config))

    return factory


@pytest.mark.parametrize(
    "case,model_factory,dataset_factory",
    [
        ("classifier-modules-to-save", lora(lambda: bert(BertForSequenceClassification, num_labels=3),
                                            target_modules=["query", "value"], modules_to_save=["classifier"]),
         lambda: as_dataset(input_ids=tokens(0), labels=tokens(6, 4, (BATCH,)) - 1)),
        ("lm-frozen-head", lora(gpt2, target_modules=["c_attn"], fan_in_fan_out=True), lm_data),
    ],
)
def test_lora_is_unbiased(case, model_factory, dataset_factory, tmp_path):
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, steps=200, control_fraction=0.5)
    assert report.passed, f"{case}: {report}"


# ---------------------------------------------------------------------------------------------- model_init, mixin


def test_model_init_rebuilds_the_sampling_and_stays_unbiased(tmp_path):
    def model_init():
        return tiny_vit()

    report = loop_z_test(model_init, image_dataset(BATCH), tmp_path, steps=200, control_fraction=0.5, trainer_kwargs={"model_init": model_init})
    assert report.passed, report


@dataclass
class Seq2SeqPredictedGradientArguments(Seq2SeqTrainingArguments, PredictedGradientSettings):
    """Seq2SeqTrainingArguments first, so that its own defaults win; the sampling settings added."""


class Seq2SeqPredictedGradientTrainer(PredictedGradientMixin, Seq2SeqTrainer):
    pass


def test_mixin_composes_with_seq2seq_trainer(tmp_path):
    report = loop_z_test(t5, seq2seq_data(), tmp_path, steps=200, control_fraction=0.5, trainer_class=Seq2SeqPredictedGradientTrainer,
                         args_class=Seq2SeqPredictedGradientArguments)
    assert report.passed, report


@pytest.mark.parametrize("family", ["gpt2-lm-tied", "t5-seq2seq"])
def test_update_is_unbiased_with_gradient_checkpointing(family, tmp_path):
    """gradient_checkpointing=True: sampled steps replay the blocks themselves; the exact reference is the
    checkpointed f = 1 step (bit-identical to Trainer's)."""
    model_factory, dataset_factory = FAMILIES[family]
    report = loop_z_test(model_factory, dataset_factory(), tmp_path, steps=200, control_fraction=0.5, args_kwargs={"gradient_checkpointing": True})
    assert report.passed, report


# ---------------------------------------------------------------------------------------------- trains as Trainer


class HeadlessRegressor(nn.Module):
    """A model with no head attribute and no output embeddings (like transformers' test RegressionModel)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, features, labels=None):
        output = self.layers(features).squeeze(-1)
        return {"loss": nn.functional.mse_loss(output, labels), "logits": output}


def headless_data():
    generator = torch.Generator().manual_seed(0)
    return as_dataset(features=torch.randn(32, 4, generator=generator), labels=torch.randn(32, generator=generator))


def assert_same_weights(reference, ours):
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fraction", ["auto", "0.5"])
def test_headless_model_trains_as_trainer_and_says_why(fraction, tmp_path, caplog):
    settings = dict(output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                    per_device_train_batch_size=8, max_steps=6, learning_rate=1e-1, seed=3)
    reference = Trainer(model=HeadlessRegressor(), args=TrainingArguments(**settings), train_dataset=headless_data())
    reference.train()
    with caplog.at_level("WARNING"):
        ours = PredictedGradientTrainer(model=HeadlessRegressor(), args=PredictedGradientArguments(**settings, control_fraction=fraction),
                                        train_dataset=headless_data())
    ours.train()
    assert any("trains as its base class does" in r.getMessage() and "no head" in r.getMessage() for r in caplog.records)
    assert_same_weights(reference.model, ours.model)


@pytest.mark.parametrize("family", ["gpt2-lm-tied", "t5-seq2seq", "bert-token-classification"])
def test_auto_at_fraction_one_is_bit_identical_to_trainer(family, tmp_path):
    """"auto" before it lowers f, every step observed (period 1, no overhead budget): scores and row norms are read
    in the backward without touching it."""
    model_factory, dataset_factory = FAMILIES[family]
    dataset = dataset_factory()
    settings = dict(output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                    per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, seed=3)
    reference = Trainer(model=model_factory(), args=TrainingArguments(**settings), train_dataset=dataset)
    reference.train()
    ours = PredictedGradientTrainer(model=model_factory(), args=PredictedGradientArguments(**settings, auto_observation_period=1, auto_observation_budget=1e9),
                                    train_dataset=dataset)
    ours.train()
    assert ours.monitor.totals["rows"] == 6 * 4 and ours.monitor.run_factors.rows == 6 * 4  # observed, every row
    assert_same_weights(reference.model, ours.model)


def sft_setup():
    """TRL's SFTTrainer with the mixin, a word-level tokenizer built here (nothing from the Hub), pre-tokenized rows."""
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t1")),
        pad_token="t0", eos_token="t2",
    )

    @dataclass
    class SFTPredictedGradientConfig(trl.SFTConfig, PredictedGradientSettings):
        pass

    class SFTPredictedGradientTrainer(PredictedGradientMixin, trl.SFTTrainer):
        pass

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, VOCAB, (int(n),), generator=generator).tolist() for n in torch.randint(4, 9, (BATCH,), generator=generator)]
    return SFTPredictedGradientTrainer, SFTPredictedGradientConfig, tokenizer, Dataset.from_dict({"input_ids": rows})


def test_mixin_composes_with_trl_sft_trainer(tmp_path):
    """With label smoothing SFTTrainer computes its loss from the model's logits: rows are sampled, unbiased."""
    trainer_class, config_class, tokenizer, dataset = sft_setup()
    report = loop_z_test(gpt2, dataset, tmp_path, steps=150, control_fraction=0.5, trainer_class=trainer_class, args_class=config_class,
                         trainer_kwargs={"processing_class": tokenizer}, args_kwargs={"label_smoothing_factor": 0.1, "max_length": 16})
    assert report.passed, report


def test_sft_fused_lm_head_trains_as_sft_trainer(tmp_path):
    """SFTTrainer's default loss projects through lm_head's weight in tiles (TRL's fused LM head), never calling the
    module: there is no boundary, so the first observed step finds none and the trainer trains as SFTTrainer."""
    trl = pytest.importorskip("trl")
    trainer_class, config_class, tokenizer, dataset = sft_setup()
    settings = dict(output_dir=str(tmp_path), report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                    per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, seed=3, max_length=16)
    reference = trl.SFTTrainer(model=gpt2(), args=trl.SFTConfig(**settings), train_dataset=dataset, processing_class=tokenizer)
    reference.train()
    ours = trainer_class(model=gpt2(), args=config_class(**settings), train_dataset=dataset, processing_class=tokenizer)
    ours.train()
    assert "did not run as modules" in ours.disabled_reason
    assert_same_weights(reference.model, ours.model)


@pytest.mark.parametrize("family", ["bert-classification", "gpt2-lm"])
def test_dropout_is_replayed_and_unbiased(family, tmp_path):
    """Default dropout (hidden 0.1, attention 0.1 through SDPA): the replayed blocks record their masks, stay replayed
    (no block turns dense) and the sampled update averages to the exact gradient of the same forward."""
    torch.manual_seed(0)
    if family == "bert-classification":
        model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=32, max_position_embeddings=32, num_labels=3))
        dataset = as_dataset(input_ids=tokens(0), labels=tokens(6, 4, (BATCH,)) - 1)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2))
        dataset = lm_data()
    args = PredictedGradientArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_train_batch_size=BATCH, control_fraction=0.5)
    trainer = PredictedGradientTrainer(model=model, args=args, train_dataset=dataset)
    report = verify_unbiased(trainer, draws=48, verbose=False)
    assert report.passed, report
    assert trainer.replay.blocks and not trainer.replay.dense

"""PreferenceDataModule: records of each form become the rows they promise; malformed data is one paragraph."""

from __future__ import annotations

import pytest
import torch

from lightningllm.data.preference import PreferenceDataModule
from lightningllm.errors import DataError
from lightningllm.prompt import PromptTemplate
from tests.alignment.conftest import write_jsonl


def module(tmp_path, records, **kwargs):
    train = write_jsonl(tmp_path / "train.jsonl", records)
    data = PreferenceDataModule(str(tmp_path / "tokenizer"), train, val_fraction=0.0, seq_len=64, **kwargs)
    data.setup("fit")
    return data


def test_a_pair_is_the_chat_prompt_then_each_reply_and_its_end_of_turn(tmp_path, tokenizer):
    data = module(tmp_path, [{"prompt": "q cd", "chosen": "aab", "rejected": "bb"}], template="chat")
    batch = next(iter(data.train_dataloader()))
    template = PromptTemplate("chat")
    prompt = template.prompt_ids(tokenizer, [{"role": "user", "content": "q cd"}])
    for row, reply in enumerate(["aab", "bb"]):
        ids = batch["input_ids"][row][batch["attention_mask"][row]].tolist()
        completion = batch["input_ids"][row][batch["completion_mask"][row]].tolist()
        assert ids == prompt + completion
        assert completion == tokenizer.encode(reply) + [tokenizer.eos_id]
    assert batch["ranks"].tolist() == [[0, 1]] and batch["index"].tolist() == [0]


def test_unpaired_mode_labels_the_best_of_a_ranking_and_pairs_mismatched_rows(tmp_path, tokenizer):
    records = [{"prompt": "q c", "responses": ["ab", "ba", "aa"], "ranking": [1, 2, 0]},
               {"prompt": "q d", "completion": "bb", "label": False}]  # fmt: skip
    data = module(tmp_path, records, template=None, unpaired=True, batch_size=4)
    batch = next(iter(torch.utils.data.DataLoader(data.datasets["train"], 4, collate_fn=data._collate())))
    assert batch["desirable"].tolist() == [False, False, True, False]
    completion = batch["kl_input_ids"][0][batch["kl_completion_mask"][0]].tolist()
    assert completion == tokenizer.encode("ba") + [tokenizer.eos_id]  # row 0's prompt with row 1's completion
    prompt = batch["kl_input_ids"][3][batch["kl_attention_mask"][3] & ~batch["kl_completion_mask"][3]].tolist()
    assert prompt == tokenizer.encode("q d")


@pytest.mark.parametrize(
    ("records", "unpaired", "expect"),
    [
        ([{"prompt": "q", "rejected": "b"}], False, "lacks a string 'chosen'"),
        ([{"chosen": "a", "rejected": "b"}], False, "no string 'prompt'"),
        ([{"prompt": "q", "responses": ["a", "b"], "ranking": [0]}], False, "as many integer ranks"),
        ([{"prompt": "q", "completion": "a", "label": "yes"}], True, "boolean 'label'"),
        ([{"prompt": "q", "completion": "a", "label": True}], False, "unpaired: true"),
        ([{"prompt": "q", "chosen": "a", "rejected": "b"},
          {"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]}], False, "ranks 2 and 3 completions"),
        ([{"prompt": "q", "chosen": "a" * 80, "rejected": "b"}], False, "more than seq_len=64"),
    ],
)  # fmt: skip
def test_malformed_data_is_one_paragraph(tmp_path, tokenizer, records, unpaired, expect):
    with pytest.raises(DataError, match=expect):
        module(tmp_path, records, template=None, unpaired=unpaired)

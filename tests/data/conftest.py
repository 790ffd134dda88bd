import pytest

from llmstack.data.synthetic import corpus
from llmstack.data.text import train_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    texts = corpus(200, seed=1) + ["naïve café — 東京 ✓ emoji 🙂", "Tabs\tand\nnewlines {braces}"]
    return train_tokenizer(texts, vocab_size=400)

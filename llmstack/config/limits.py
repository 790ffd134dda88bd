"""Upper bounds of the configuration's sizes and counts: what can run. A value past them ends in a
MemoryError, a Rust abort in the tokenizer trainer or a seed numpy refuses, long after start-up; the schema's
`le=` bounds turn each into a one-line error naming the key."""

SEED_MAX = 2**32 - 1  # numpy's seeds (set by accelerate's set_seed) are 32-bit
VOCAB_MAX = 1 << 20  # the largest released vocabularies hold ~256k tokens
TOKENS_MAX = 1 << 20  # tokens in one sequence, prompt or answer
BATCH_MAX = 1 << 16  # sequences per micro-batch, micro-batches per step
SHARDS_MAX = 1 << 20
COUNT_MAX = 10**9  # steps, cadences, words, documents: anything larger is a typo

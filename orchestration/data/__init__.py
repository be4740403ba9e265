"""The data plane: public datasets' shards -> Ray Data -> the training loops.

    records.py    readers for each format (COYO parquet / webdataset, MMC4, OpenVid-1M, ShareGPT4V),
                  local or s3://, streaming, one normalized record schema; shard errors name the file
    decode.py     images -> RGB at the tower's size; mp4 -> 8 frames (PyAV); every bad record -> a reason
    stats.py      the named actor that skipped records, samples and tokens are counted into
    mixture.py    weights -> which shards are read how often and in which order; realized shares
    sources.py    config -> read plan -> Ray dataset of normalized records
    tower_data.py stage 1: pixels + tower text tokens (CPU map_batches); the labelled eval split
    lm_data.py    stage 2: decode, then the tokenization actor pool (frozen tower codes, LLM tokenizer,
                  sequence builder, packing into vilau_model.sequence's row format)
    cache.py      the tokenized-shard cache and its manifest (written by jobs/tokenize_data.py)
    pipeline.py   the public API the training loops and jobs use (start here)
    synthetic.py  generated shards in the real formats (tests, the embedded default)
"""

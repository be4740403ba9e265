"""The data plane: public datasets' shards -> Ray Data -> the training loops.

    records.py    readers for each format (COYO parquet / webdataset, MMC4, OpenVid-1M, ShareGPT4V),
                  local or s3://, streaming, one normalized record schema; shard errors name the file
    decode.py     images -> RGB at the tower's size; mp4 -> 8 frames (PyAV); every bad record -> a reason
    stats.py      the bad-record vocabulary; dropped records travel with the rows (distinct counts);
                  the named actor that driver-side builds count into
    mixture.py    weights -> read units (shards, parquet row-group ranges) and repeat factors; shares
    epochs.py     each epoch's order from (seed, epoch), per-rank shares, windows through a shuffle
                  buffer, sample ids and the data position (exactly-once resume)
    sources.py    config -> epoch plan -> a rank's Ray dataset of normalized records
    tower_data.py stage 1: pixels + tower text tokens (CPU map_batches); the labelled eval split
    lm_data.py    stage 2: decode, then the tokenization actor pool (frozen tower codes, LLM tokenizer,
                  sequence builder, packing into vilau_model.sequence's row format)
    cache.py      the tokenized-shard cache and its manifest (written by jobs/tokenize_data.py)
    pipeline.py   the public API the training loops and jobs use (start here)
    synthetic.py  generated shards in the real formats (tests, the embedded default)
"""

"""Writing shards: sources (folders, tables, URL downloads, tars), image preparation, dedup, the shard writer
and its parallel, resumable driver, inspection, tokenizer training and generated corpora. The reading side
(`mmscale.data`) never imports from here."""

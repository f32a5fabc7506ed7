"""A pod-scale ~1B dense LM on a prepared web corpus with a 32k BPE: FSDP over all devices, bf16
compute, remat, seq 2048. Paths default to a gcsfuse mount of the bucket (`/gcs/BUCKET`, as
MaxText reads ArrayRecord); change them with --config.data.sources / --config.data.tokenizer.

1. A 32k BPE from a deterministic 2 GB sample of the corpus (streams; nothing held whole):

    python -m gqlm.tokenize --kind bpe --input 'gs://BUCKET/raw/*.parquet' --text_key text \\
        --vocab_size 32768 --sample_bytes 2000000000 --out /gcs/BUCKET/bpe32k

2. Prepare the corpus once on Dataflow (the same shards as --runner=local; see BUILD.md):

    python -m gqlm.prepare --input 'gs://BUCKET/raw/*.parquet' --text_key text \\
        --tokenizer bpe:/gcs/BUCKET/bpe32k --out gs://BUCKET/web_bpe32k --runner beam \\
        --beam_options "--runner=DataflowRunner --project=PROJECT --region=REGION \\
                        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py"

3. Train on a pod (launch/README.md; re-running the same command resumes):

    python launch/tpu.py launch --name gqlm-1b --zone us-east5-a --accelerator_type v5p-64 -- \\
        python -m gqlm.train --config experiments/dense_1b.py --workdir gs://BUCKET/runs/dense_1b

Anywhere, without the data or the tokenizer (the vocabulary size is explicit):

    python -m gqlm.train --config experiments/dense_1b.py --dry_run

`get_config("350m")` etc. gives the other sizes on the same data.
"""

from gqlm.presets import dense_experiment


def get_config(arg: str = ""):
    config = dense_experiment(arg or "1b")
    d = config.data
    d.corpus = "prepared"
    d.sources = "/gcs/BUCKET/web_bpe32k"  # a mixture: "/gcs/BUCKET/web=0.8,/gcs/BUCKET/code=0.2"
    d.tokenizer = "bpe:/gcs/BUCKET/bpe32k"
    config.model.vocab_size = 32768  # the BPE's ids (a multiple of 128: shards evenly)
    return config

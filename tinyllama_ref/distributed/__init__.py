"""Past one machine: data-parallel runs and pipeline stages on Ray actors (extra: [distributed]).

    cluster.py   joining a Ray cluster (`ray start`, or a private local one); errors from remote actors
    shard.py     contiguous pieces of about equal cost: items into chunks, layers into stages
    workers.py   the data-parallel worker actor: one loaded model, units of work run on it
    runner.py    DataParallel: chunks over a pool of workers, results in input order, dead workers replaced
    tasks.py     the commands' units of work (score, perplexity, generate) planned as one process plans them
    stage.py     a pipeline stage actor: a contiguous range of layers resident, their KV cache
    pipeline.py  PipelineModel: K stages behind the engine's model interface (forward, new_cache, ...)
    bench.py     a pipeline's cost per pass against one process, and a projection to more layers/machines

docs/distributed.md says how to start a cluster on several machines and point the commands at it.
"""

"""The inference engine: paged MQA KV cache, continuous-batching scheduler with a latency
bound, model runner, sampler, and the ``Engine`` that ties them together."""

"""``stream-worker sink``: the results topic into PostgreSQL, exactly once.

consume → decode (the ``kafka.result_format`` serializer) → validate against ``result.v2.json``
and map to a row (:mod:`.rows`, pure) → upsert the rows and store the consumed offsets in one
database transaction (:mod:`.store`, the PostgreSQL edge) → commit the offsets to the consumer
group too, for the lag (:mod:`.loop`). The database's offsets are the truth: a sink starts each
partition where its table says, so a crash at any point neither loses nor duplicates a row.
"""

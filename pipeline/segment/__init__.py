"""The segment job: inputs, plan, stages, model actors, the commit protocol and the lease.

``pipeline.segment.driver.segment`` runs it; the other modules are its parts.
"""

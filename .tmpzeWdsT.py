from prefect import flow
raise RuntimeError('boom on import')

@flow
def broken():
    pass

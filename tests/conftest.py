import pytest
import torch

# On 2 shared cores torch's spinning worker threads slow everything down when the other core is
# busy (Ray, a second process); one thread is both faster and steadier for these small tensors.
torch.set_num_threads(1)


class S3Server:
    """A running moto S3 server: its endpoint URL and the secret key the tests' AWS chain
    holds (tests look for it where it must never appear)."""

    def __init__(self, endpoint: str, secret: str) -> None:
        self.endpoint = endpoint
        self.secret = secret

    def client(self):  # noqa: ANN201 (a boto3 S3 client)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self) -> str:
        """A new, empty bucket."""
        import uuid

        name = f"ganpipe-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback (real HTTP: boto3, pyarrow and MLflow talk to it as to
    any S3-compatible store), with credentials in the environment as the AWS chain reads
    them. The shared Ray instance is started after it, so its processes inherit them as a
    cluster's nodes have their own."""
    import logging
    import uuid

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    secret = f"ganpipe-test-secret-{uuid.uuid4().hex}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "ganpipe-test-key")
        env.setenv("AWS_SECRET_ACCESS_KEY", secret)
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing here
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                     "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):  # fmt: skip
            env.delenv(name, raising=False)
        yield S3Server(f"http://{host}:{port}", secret)
    server.stop()

"""Names of the stream protocols a server handles (shared by server and client, so neither imports the other)."""

PROTOCOL_INFO = "potluck.info"  # one InfoRequest -> InfoResponse
PROTOCOL_INFERENCE = "potluck.inference"  # OpenInference, then InferenceStep* on one long-lived stream
PROTOCOL_FORWARD = "potluck.forward"  # one ForwardRequest -> ForwardResult
PROTOCOL_BACKWARD = "potluck.backward"  # one BackwardRequest -> BackwardResult
PROTOCOL_PUSH = (
    "potluck.push"  # server -> next server: PushHello -> PushAccepted, then InferenceStep(push=True)*
)

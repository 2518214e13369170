package tokens

import "strings"

const azureDeployments = "/openai/deployments/"

// routeAzure matches /openai/deployments/{deployment}/{operation} anywhere
// in the path. The deployment, not the body's model, is what Azure runs and
// bills, so it becomes pathModel. Azure's newer /openai/v1/... API takes the
// model from the body and is routed as plain OpenAI instead. The body of an
// Azure request is read by the OpenAI rules.
func routeAzure(path string) (Dialect, Endpoint, string) {
	i := strings.Index(path, azureDeployments)
	if i < 0 {
		return DialectUnknown, EndpointUnknown, ""
	}
	rest := path[i+len(azureDeployments):]
	slash := strings.IndexByte(rest, '/')
	if slash <= 0 {
		return DialectUnknown, EndpointUnknown, ""
	}
	deployment, op := rest[:slash], rest[slash+1:]
	var ep Endpoint
	switch op {
	case "chat/completions":
		ep = EndpointChat
	case "completions":
		ep = EndpointCompletion
	case "embeddings":
		ep = EndpointEmbedding
	case "responses":
		ep = EndpointResponses
	default:
		return DialectUnknown, EndpointUnknown, ""
	}
	return DialectAzure, ep, deployment
}

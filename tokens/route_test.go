package tokens

import (
	"strings"
	"testing"
)

func TestRoute(t *testing.T) {
	tests := []struct {
		method, path string
		d            Dialect
		ep           Endpoint
		model        string
	}{
		// OpenAI and compatibles.
		{"POST", "/v1/chat/completions", DialectOpenAI, EndpointChat, ""},
		{"POST", "/chat/completions", DialectOpenAI, EndpointChat, ""},
		{"POST", "/llm/v1/chat/completions", DialectOpenAI, EndpointChat, ""},
		{"POST", "/openai/v1/chat/completions", DialectOpenAI, EndpointChat, ""}, // Azure v1 API
		{"POST", "/v1/completions", DialectOpenAI, EndpointCompletion, ""},
		{"POST", "/v1/embeddings", DialectOpenAI, EndpointEmbedding, ""},
		{"POST", "/v1/responses", DialectOpenAI, EndpointResponses, ""},
		{"POST", "/openai/responses", DialectOpenAI, EndpointResponses, ""},
		{"POST", "/v1/responses/resp_123/cancel", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1/responses/resp_123", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1/responses/input_tokens", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1/chat/completions/", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1/chat/completions?stream=true", DialectUnknown, EndpointUnknown, ""}, // a literal '?' in a decoded path
		{"POST", "/v1/xcompletions", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1/models", DialectUnknown, EndpointUnknown, ""},
		{"GET", "/v1/chat/completions", DialectUnknown, EndpointUnknown, ""},
		{"get", "/v1/chat/completions", DialectUnknown, EndpointUnknown, ""},
		{"PUT", "/v1/chat/completions", DialectUnknown, EndpointUnknown, ""},
		{"OPTIONS", "/v1/messages", DialectUnknown, EndpointUnknown, ""},
		{"POST", "", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/", DialectUnknown, EndpointUnknown, ""},

		// Azure deployments.
		{"POST", "/openai/deployments/gpt4o-prod/chat/completions", DialectAzure, EndpointChat, "gpt4o-prod"},
		{"POST", "/openai/deployments/d1/completions", DialectAzure, EndpointCompletion, "d1"},
		{"POST", "/openai/deployments/emb/embeddings", DialectAzure, EndpointEmbedding, "emb"},
		{"POST", "/openai/deployments/r/responses", DialectAzure, EndpointResponses, "r"},
		{"POST", "/eastus/openai/deployments/gpt-4/chat/completions", DialectAzure, EndpointChat, "gpt-4"},
		{"GET", "/openai/deployments/gpt-4/chat/completions", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/openai/deployments/gpt-4/images/generations", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/openai/deployments/gpt-4/audio/transcriptions", DialectUnknown, EndpointUnknown, ""},
		// An empty deployment is not Azure; the suffix still says OpenAI.
		{"POST", "/openai/deployments//chat/completions", DialectOpenAI, EndpointChat, ""},

		// Anthropic.
		{"POST", "/v1/messages", DialectAnthropic, EndpointMessages, ""},
		{"POST", "/anthropic/v1/messages", DialectAnthropic, EndpointMessages, ""},
		{"POST", "/v1/messages/count_tokens", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1/messages/batches", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v2/messages", DialectUnknown, EndpointUnknown, ""},

		// Gemini.
		{"POST", "/v1beta/models/gemini-2.0-flash:generateContent", DialectGemini, EndpointGenerate, "gemini-2.0-flash"},
		{"POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", DialectGemini, EndpointStreamGenerate, "gemini-2.0-flash"},
		{"POST", "/v1/models/gemini-1.5-pro:generateContent", DialectGemini, EndpointGenerate, "gemini-1.5-pro"},
		{"POST", "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-pro:streamGenerateContent", DialectGemini, EndpointStreamGenerate, "gemini-2.5-pro"},
		{"POST", "/gemini/v1beta/models/m:generateContent", DialectGemini, EndpointGenerate, "m"},
		{"POST", "/v1beta/models/:generateContent", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1beta/models/gemini:countTokens", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1beta/models/gemini:embedContent", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1beta/tunedModels/x:generateContent", DialectUnknown, EndpointUnknown, ""},
		{"POST", "gemini:generateContent", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/v1beta/models/a/b:generateContent", DialectUnknown, EndpointUnknown, ""},
		{"GET", "/v1beta/models/gemini-2.0-flash:generateContent", DialectUnknown, EndpointUnknown, ""},

		// Ollama native.
		{"POST", "/api/chat", DialectOllama, EndpointChat, ""},
		{"POST", "/api/generate", DialectOllama, EndpointGenerate, ""},
		{"POST", "/api/embed", DialectOllama, EndpointEmbedding, ""},
		{"POST", "/api/embeddings", DialectOllama, EndpointEmbedding, ""},
		{"POST", "/ollama/api/chat", DialectOllama, EndpointChat, ""},
		{"POST", "/api/tags", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/api/pull", DialectUnknown, EndpointUnknown, ""},
		{"POST", "/api/chat/completions", DialectOpenAI, EndpointChat, ""}, // Open WebUI style
		{"GET", "/api/chat", DialectUnknown, EndpointUnknown, ""},
	}
	for _, tt := range tests {
		d, ep, m := Route(tt.method, tt.path)
		if d != tt.d || ep != tt.ep || m != tt.model {
			t.Errorf("Route(%q, %q) = %v, %v, %q; want %v, %v, %q", tt.method, tt.path, d, ep, m, tt.d, tt.ep, tt.model)
		}
		if m != "" && !strings.Contains(tt.path, m) {
			t.Errorf("Route(%q): model %q is not part of the path", tt.path, m)
		}
	}
}

func TestRouteNoAlloc(t *testing.T) {
	paths := []string{
		"/openai/deployments/gpt4o/chat/completions",
		"/v1beta/models/gemini-2.0-flash:streamGenerateContent",
		"/v1/chat/completions",
		"/api/embeddings",
		"/not/an/llm",
	}
	allocs := testing.AllocsPerRun(100, func() {
		for _, p := range paths {
			Route("POST", p)
		}
	})
	if allocs != 0 {
		t.Fatalf("Route allocates %v times per run", allocs)
	}
}

func TestStrings(t *testing.T) {
	for d, want := range map[Dialect]string{
		DialectUnknown: "unknown", DialectOpenAI: "openai", DialectAzure: "azure",
		DialectAnthropic: "anthropic", DialectGemini: "gemini", DialectOllama: "ollama", 200: "unknown",
	} {
		if got := d.String(); got != want {
			t.Errorf("Dialect(%d).String() = %q, want %q", d, got, want)
		}
	}
	for e, want := range map[Endpoint]string{
		EndpointUnknown: "unknown", EndpointChat: "chat", EndpointCompletion: "completion",
		EndpointEmbedding: "embedding", EndpointResponses: "responses", EndpointMessages: "messages",
		EndpointGenerate: "generate", EndpointStreamGenerate: "stream_generate", 200: "unknown",
	} {
		if got := e.String(); got != want {
			t.Errorf("Endpoint(%d).String() = %q, want %q", e, got, want)
		}
	}
}

func FuzzRoute(f *testing.F) {
	f.Add("POST", "/openai/deployments/x/chat/completions")
	f.Add("POST", "/v1beta/models/m:streamGenerateContent")
	f.Add("POST", "/api/embeddings")
	f.Fuzz(func(t *testing.T, method, path string) {
		d, ep, m := Route(method, path)
		if d == DialectUnknown && (ep != EndpointUnknown || m != "") {
			t.Fatalf("unknown dialect with endpoint %v model %q", ep, m)
		}
		if d != DialectUnknown && ep == EndpointUnknown {
			t.Fatalf("dialect %v without endpoint", d)
		}
		if !strings.Contains(path, m) {
			t.Fatalf("model %q not in path %q", m, path)
		}
	})
}

package fakellm

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// obj keeps the response literals short; encoding/json sorts map keys, so
// output is deterministic.
type obj = map[string]any

// dialect is one provider's wire conventions for things every endpoint
// shares. Endpoint bodies live in the per-provider op functions.
type dialect interface {
	// writeError renders e in the provider's error envelope.
	writeError(w http.ResponseWriter, e apiError)
	// setRateLimitHeaders adds the provider's own rate-limit headers, if
	// it has any.
	setRateLimitHeaders(h http.Header, s snapshot)
}

// apiError is a refusal, independent of the envelope it is rendered in.
type apiError struct {
	status     int
	message    string
	limitType  string        // for 429: "requests" or "tokens"
	retryAfter time.Duration // for 429
	retryHint  bool          // for 429: put retryAfter in the body, if the dialect does
}

// op answers one admitted, parsed request.
type op func(c *call)

// routed is where a path leads. op is nil for an unknown endpoint; dialect
// is then whatever the path prefix suggested, OpenAI otherwise.
type routed struct {
	dialect dialect
	op      op
	model   string // from the path (Azure deployment, Gemini model), if any
}

// route maps a path to a dialect and endpoint. Paths are matched by suffix
// so that a proxy may mount an upstream under a prefix.
func route(path string) routed {
	if _, rest, ok := strings.Cut(path, "/openai/deployments/"); ok {
		dep, sub, _ := strings.Cut(rest, "/")
		r := routed{dialect: openAI{}, model: dep}
		switch sub {
		case "chat/completions":
			r.op = openAIChat
		case "completions":
			r.op = openAICompletions
		case "embeddings":
			r.op = openAIEmbeddings
		}
		return r
	}
	for _, e := range suffixRoutes {
		if strings.HasSuffix(path, e.suffix) {
			return routed{dialect: e.dialect, op: e.op}
		}
	}
	if i := strings.Index(path, "/models/"); i >= 0 {
		if j := strings.LastIndex(path, ":"); j > i {
			r := routed{dialect: gemini{}, model: path[i+len("/models/") : j]}
			switch path[j+1:] {
			case "generateContent":
				r.op = geminiGenerate
			case "streamGenerateContent":
				r.op = geminiStream
			}
			return r
		}
	}
	return routed{dialect: openAI{}}
}

// suffixRoutes are the endpoints recognised by a fixed path suffix. A new
// endpoint of an existing dialect is one more entry here.
var suffixRoutes = []struct {
	suffix  string
	dialect dialect
	op      op
}{
	{"/v1/chat/completions", openAI{}, openAIChat},
	{"/v1/completions", openAI{}, openAICompletions},
	{"/v1/embeddings", openAI{}, openAIEmbeddings},
	{"/v1/responses", openAI{}, openAIResponses},
	{"/v1/messages", anthropic{}, anthropicMessages},
	{"/api/chat", ollama{}, ollamaChat},
	{"/api/generate", ollama{}, ollamaGenerate},
	{"/api/embed", ollama{}, ollamaEmbed},
}

// call is one admitted request on its way to an op.
type call struct {
	s       *Server
	w       http.ResponseWriter
	r       *http.Request
	dialect dialect
	raw     []byte
	body    map[string]any
	// model is echoed in responses: the path's model if it has one,
	// else the body's "model".
	model            string
	now              time.Time
	promptTokens     int
	completionTokens int
}

// defaultModel is echoed when a request names no model, which real
// providers would refuse but tests need not bother with.
const defaultModel = "fake-model"

// parse decodes the body as a JSON object, tolerating unknown fields.
func (c *call) parse() error {
	if len(bytes.TrimSpace(c.raw)) == 0 {
		return errors.New("empty body")
	}
	if err := json.Unmarshal(c.raw, &c.body); err != nil {
		return err
	}
	if c.body == nil {
		return errors.New("body is null, want a JSON object")
	}
	if c.model == "" {
		if m, ok := c.body["model"].(string); ok && m != "" {
			c.model = m
		} else {
			c.model = defaultModel
		}
	}
	return nil
}

// boolField reads a boolean field, def when absent or not a boolean.
func (c *call) boolField(name string, def bool) bool {
	if v, ok := c.body[name].(bool); ok {
		return v
	}
	return def
}

// includeUsage reports OpenAI's stream_options.include_usage.
func (c *call) includeUsage() bool {
	so, _ := c.body["stream_options"].(map[string]any)
	v, _ := so["include_usage"].(bool)
	return v
}

// chunks is the number of content chunks a response is made of.
func (c *call) chunks() int { return c.s.cfg.StreamChunks }

// piece is the text of content chunk i (from 0).
func (c *call) piece(i int) string {
	if i == 0 {
		return "fake1"
	}
	return fmt.Sprintf(" fake%d", i+1)
}

// text is the whole generated text, the concatenation of every piece.
func (c *call) text() string {
	var b strings.Builder
	for i := range c.chunks() {
		b.WriteString(c.piece(i))
	}
	return b.String()
}

// cumulativeCompletion is the completion tokens reported after chunk i,
// reaching completionTokens at the last chunk.
func (c *call) cumulativeCompletion(i int) int {
	return c.completionTokens * (i + 1) / c.chunks()
}

func (c *call) totalTokens() int { return c.promptTokens + c.completionTokens }

// writeJSON answers with v as a JSON document.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// embeddingInputs counts the inputs of an embeddings request: one per
// string in a list of strings, one otherwise (a single string, or a token
// array).
func embeddingInputs(v any) []string {
	switch in := v.(type) {
	case string:
		return []string{in}
	case []any:
		out := make([]string, 0, len(in))
		for _, e := range in {
			s, ok := e.(string)
			if !ok {
				return []string{fmt.Sprint(v)}
			}
			out = append(out, s)
		}
		if len(out) > 0 {
			return out
		}
	}
	return []string{fmt.Sprint(v)}
}

// embeddingDims is the length of fake embedding vectors: short, since
// nothing reads them but JSON decoders.
const embeddingDims = 8

// embedding derives a deterministic vector in [-1, 1] from input.
func embedding(input string) []float64 {
	sum := sha256.Sum256([]byte(input))
	v := make([]float64, embeddingDims)
	for i := range v {
		v[i] = float64(int(sum[i])-128) / 128
	}
	return v
}

// Package tokens recognises LLM API requests and extracts what a rate
// limiter needs from them before they reach the upstream.
//
// The work is split in three steps so that the common case stays cheap:
// Route looks only at the method and path (no allocation, no body), Parse
// reads the body once with a pooled, reusable parser, and WriteError answers
// a refused request in the shape the client's SDK expects, so that its retry
// logic and error messages keep working.
//
// Five API dialects are understood: OpenAI (and everything that copies it:
// vLLM, llama.cpp, Ollama's /v1, Azure's v1 API), Azure OpenAI deployments,
// Anthropic Messages, Google Gemini (AI Studio and Vertex) and Ollama's
// native API. Paths are matched on their tail, so gateways that mount an
// API under a prefix such as /llm/v1/... still work.
package tokens

import (
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/valyala/fastjson"
)

// Dialect is the API family a request belongs to. It decides how the body
// is read and how an error is shaped, because every family names its fields
// and error objects differently.
type Dialect uint8

// The recognised dialects. DialectUnknown is the zero value so that a
// forgotten assignment never pretends to know the API.
const (
	// DialectUnknown is any request Route does not recognise; the module
	// passes such requests through untouched.
	DialectUnknown Dialect = iota
	// DialectOpenAI covers OpenAI paths; also served by vLLM, llama.cpp and
	// Ollama's /v1.
	DialectOpenAI
	// DialectAzure is /openai/deployments/{deployment}/..., where the
	// deployment in the path, not the body, selects the model.
	DialectAzure
	// DialectAnthropic is /v1/messages.
	DialectAnthropic
	// DialectGemini is .../models/{model}:generateContent and
	// :streamGenerateContent.
	DialectGemini
	// DialectOllama is the native /api/chat, /api/generate, /api/embed and
	// /api/embeddings.
	DialectOllama
)

var dialectNames = [...]string{"unknown", "openai", "azure", "anthropic", "gemini", "ollama"}

// String returns the dialect's lower-case name, suitable for logs and
// metric labels; out-of-range values report "unknown" rather than panic.
func (d Dialect) String() string {
	if int(d) < len(dialectNames) {
		return dialectNames[d]
	}
	return "unknown"
}

// Endpoint is the kind of operation within a dialect. It matters because
// embeddings produce no output tokens and only some endpoints stream.
type Endpoint uint8

// The recognised endpoints.
const (
	// EndpointUnknown is the zero value: not a recognised operation.
	EndpointUnknown Endpoint = iota
	// EndpointChat is a chat completion (OpenAI chat/completions, Ollama
	// /api/chat).
	EndpointChat
	// EndpointCompletion is a legacy text completion (OpenAI completions).
	EndpointCompletion
	// EndpointEmbedding produces embeddings and no output tokens.
	EndpointEmbedding
	// EndpointResponses is OpenAI's Responses API.
	EndpointResponses
	// EndpointMessages is Anthropic's Messages API.
	EndpointMessages
	// EndpointGenerate is Gemini generateContent and Ollama /api/generate.
	EndpointGenerate
	// EndpointStreamGenerate is Gemini streamGenerateContent. It is separate
	// from EndpointGenerate because Gemini selects streaming by path, not
	// by a body field, and Parse never sees the path.
	EndpointStreamGenerate
)

var endpointNames = [...]string{"unknown", "chat", "completion", "embedding", "responses", "messages", "generate", "stream_generate"}

// String returns the endpoint's lower-case name, suitable for logs and
// metric labels.
func (e Endpoint) String() string {
	if int(e) < len(endpointNames) {
		return endpointNames[e]
	}
	return "unknown"
}

// MaxModelLen bounds Request.Model in bytes, because the model name becomes
// a rate-limit key and a metric label and must not let a client inflate
// memory or cardinality.
const MaxModelLen = 256

// Request is what the module needs from a request body to charge it against
// a limit before forwarding it.
type Request struct {
	// Dialect and Endpoint are copied from Route.
	Dialect  Dialect
	Endpoint Endpoint
	// Model is valid UTF-8, at most MaxModelLen bytes; "" when neither the
	// path nor the body names one. Azure and Gemini take it from the path.
	Model string
	// Stream reports whether the response will be streamed. Ollama streams
	// unless told otherwise; Gemini streams on streamGenerateContent.
	Stream bool
	// MaxOutputTokens is the client's cap on generated tokens per choice;
	// 0 when the request names none.
	MaxOutputTokens int64
	// Choices is how many completions are generated (OpenAI n, and best_of
	// for legacy completions since those are generated and billed too;
	// Gemini candidateCount); 1 when not given or < 1.
	Choices int64
	// PromptChars counts the runes of text the model reads (message
	// contents, prompts, system instructions, tool-call arguments), for a
	// later token estimator. Roles, JSON punctuation and base64 media are
	// not counted. Token-id arrays (OpenAI prompt/input given as integers,
	// Ollama generate context) add 4 per id, since each id is one token and
	// estimators assume about 4 characters per token.
	PromptChars int64
	// PromptCJK counts those of PromptChars that are Han, Hiragana,
	// Katakana or Hangul, which tokenise at roughly one token per rune
	// rather than four runes per token.
	PromptCJK int64
	// HasStreamOptions reports an OpenAI-style stream_options object, and
	// IncludeUsage its include_usage: true, which makes the final chunk of
	// a stream carry the usage.
	HasStreamOptions, IncludeUsage bool
}

// ParseError is returned by Parse when a body cannot be accepted. Msg is
// written for the client: it names the offending field or byte offset but
// never echoes the body, so it is safe to return in a 400 response.
type ParseError struct {
	// Msg is the client-safe description.
	Msg string
}

// Error returns Msg.
func (e *ParseError) Error() string { return e.Msg }

// Route recognises the dialect from the method and URL path (without the
// query string). It never allocates: pathModel is a substring of path (the
// Azure deployment or the Gemini model, "" otherwise). Only POST is
// recognised, because only POST requests generate tokens; anything else is
// DialectUnknown.
//
// Rules are tried from the most to the least specific, so that an Azure
// deployment path is not mistaken for plain OpenAI and Ollama's
// /api/embeddings is not mistaken for OpenAI's /embeddings.
func Route(method, path string) (d Dialect, ep Endpoint, pathModel string) {
	if method != "POST" {
		return DialectUnknown, EndpointUnknown, ""
	}
	if d, ep, m := routeAzure(path); d != DialectUnknown {
		return d, ep, m
	}
	if d, ep := routeAnthropic(path); d != DialectUnknown {
		return d, ep, ""
	}
	if d, ep, m := routeGemini(path); d != DialectUnknown {
		return d, ep, m
	}
	if d, ep := routeOllama(path); d != DialectUnknown {
		return d, ep, ""
	}
	if d, ep := routeOpenAI(path); d != DialectUnknown {
		return d, ep, ""
	}
	return DialectUnknown, EndpointUnknown, ""
}

// Parser parses request bodies. A Parser is not safe for concurrent use;
// take one from GetParser and return it with PutParser so that its buffers
// are reused and steady-state parsing does not allocate.
type Parser struct {
	fj fastjson.Parser
	// scratch receives re-serialised JSON (tool arguments given as objects)
	// whose length is counted as prompt text.
	scratch []byte
	// values and bodyLen describe the last body, so PutParser can drop
	// parsers that grew large instead of pinning that memory in the pool.
	values  int
	bodyLen int
}

// Limits above which PutParser lets a Parser be garbage collected: fastjson
// keeps about 80 bytes per JSON value, so one huge body would otherwise
// keep its whole tree alive in the pool for good.
const (
	poolMaxValues  = 1 << 16
	poolMaxBodyLen = 1 << 20
)

var parserPool = sync.Pool{New: func() any { return new(Parser) }}

// GetParser returns a Parser from a pool.
func GetParser() *Parser { return parserPool.Get().(*Parser) }

// PutParser returns p to the pool. p must not be used afterwards. Parsers
// that handled unusually large bodies are dropped so that their memory is
// reclaimed.
func PutParser(p *Parser) {
	if p == nil || p.values > poolMaxValues || p.bodyLen > poolMaxBodyLen || cap(p.scratch) > poolMaxBodyLen {
		return
	}
	parserPool.Put(p)
}

var errNotObject = &ParseError{Msg: "request body must be a JSON object"}

// Parse fills req from body. d, ep and pathModel come from Route. It returns
// a *ParseError when the body is not valid JSON (strict RFC 8259, nested at
// most 256 levels), is not a JSON object, or a known field has the wrong
// type (e.g. "model": 5, "max_tokens": "x"). It never panics on any input.
//
// Only the scalar fields that drive limits (model, stream, token caps,
// choice counts and the objects holding them) are type-checked. The
// structures mined for prompt text are read leniently, shapes not
// understood contributing nothing, so that new content formats never make
// the limiter reject a request the upstream would accept.
//
// Duplicate keys resolve to the last occurrence, as in the Python, Go and
// JavaScript JSON decoders upstreams use, so a client cannot show the
// limiter one value and the upstream another.
//
// DialectUnknown is read with the OpenAI rules for model, stream, token cap
// and n, without prompt counting.
func (p *Parser) Parse(d Dialect, ep Endpoint, pathModel string, body []byte, req *Request) error {
	*req = Request{Dialect: d, Endpoint: ep, Choices: 1}
	p.bodyLen = len(body)
	n, perr := validateJSON(body)
	p.values = n
	if perr != nil {
		return perr
	}
	if firstNonSpace(body) != '{' {
		return errNotObject
	}
	root, err := p.fj.ParseBytes(body)
	if err != nil || root.Type() != fastjson.TypeObject {
		// Unreachable after validateJSON; kept so that a disagreement
		// between the two parsers is an error, not a panic.
		return &ParseError{Msg: "request body is not valid JSON"}
	}
	useBodyModel := pathModel == ""
	var model []byte
	switch d {
	case DialectAnthropic:
		model, err = p.parseAnthropic(root, useBodyModel, req)
	case DialectGemini:
		model, err = p.parseGemini(ep, root, useBodyModel, req)
	case DialectOllama:
		model, err = p.parseOllama(ep, root, useBodyModel, req)
	default:
		model, err = p.parseOpenAI(ep, root, useBodyModel, req)
	}
	if err != nil {
		return err
	}
	if req.Choices < 1 {
		req.Choices = 1
	}
	if useBodyModel {
		req.Model = sanitizeModelBytes(model)
	} else {
		req.Model = sanitizeModel(pathModel)
	}
	return nil
}

// sanitizeModel makes s valid UTF-8 of at most MaxModelLen bytes. It does
// not allocate when s already qualifies.
func sanitizeModel(s string) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	return s[:truncLen(s)]
}

// sanitizeModelBytes is sanitizeModel for bytes borrowed from the parser's
// buffer; it copies them exactly once, into the returned string.
func sanitizeModelBytes(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	if !utf8.Valid(b) {
		return sanitizeModel(string(b))
	}
	return string(b[:truncLen(b)])
}

// truncLen returns the largest length ≤ MaxModelLen that ends on a rune
// boundary of the valid UTF-8 text s.
func truncLen[T string | []byte](s T) int {
	if len(s) <= MaxModelLen {
		return len(s)
	}
	n := MaxModelLen
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return n
}

func firstNonSpace(b []byte) byte {
	for _, c := range b {
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return c
		}
	}
	return 0
}

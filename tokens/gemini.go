package tokens

import (
	"strings"

	"github.com/valyala/fastjson"
)

const (
	geminiGenerate       = ":generateContent"
	geminiStreamGenerate = ":streamGenerateContent"
)

// routeGemini matches a last segment models/{model}:generateContent or
// :streamGenerateContent, which covers AI Studio (/v1beta/models/...) and
// Vertex (/v1/projects/p/locations/l/publishers/google/models/...). The
// model is taken from the path because Gemini bodies do not name it.
func routeGemini(path string) (Dialect, Endpoint, string) {
	var ep Endpoint
	var rest string
	switch {
	case strings.HasSuffix(path, geminiGenerate):
		ep, rest = EndpointGenerate, path[:len(path)-len(geminiGenerate)]
	case strings.HasSuffix(path, geminiStreamGenerate):
		ep, rest = EndpointStreamGenerate, path[:len(path)-len(geminiStreamGenerate)]
	default:
		return DialectUnknown, EndpointUnknown, ""
	}
	slash := strings.LastIndexByte(rest, '/')
	if slash < 0 || slash == len(rest)-1 || !strings.HasSuffix(rest[:slash+1], "/models/") {
		return DialectUnknown, EndpointUnknown, ""
	}
	return DialectGemini, ep, rest[slash+1:]
}

// parseGemini reads a generateContent body. Field names are accepted in
// both lowerCamelCase and snake_case, because proto3 JSON parsing (which
// the Gemini API uses) accepts both; otherwise a client could hide its
// token cap from the limiter by spelling it the other way. Integers may be
// quoted for the same reason. The model always comes from the path.
func (p *Parser) parseGemini(ep Endpoint, root *fastjson.Value, useBodyModel bool, req *Request) (model []byte, err error) {
	var contents, system, config *fastjson.Value
	root.GetObject().Visit(func(k []byte, v *fastjson.Value) {
		if err != nil {
			return
		}
		switch string(k) {
		case "model":
			// Only reachable when a caller has no path model; the REST
			// API ignores it, but it is the best name available.
			if useBodyModel && v.Type() == fastjson.TypeString {
				model, _ = v.StringBytes()
			}
		case "contents":
			contents = v
		case "systemInstruction", "system_instruction":
			system = v
		case "generationConfig", "generation_config":
			config, err = objectField(v, "generationConfig")
		}
	})
	if err != nil {
		return nil, err
	}
	visit(config, func(k []byte, v *fastjson.Value) {
		if err != nil {
			return
		}
		switch string(k) {
		case "maxOutputTokens", "max_output_tokens":
			req.MaxOutputTokens, _, err = p.intField(v, "generationConfig.maxOutputTokens", true, false)
		case "candidateCount", "candidate_count":
			req.Choices, _, err = p.intField(v, "generationConfig.candidateCount", true, false)
		}
	})
	if err != nil {
		return nil, err
	}
	req.Stream = ep == EndpointStreamGenerate

	if contents != nil && contents.Type() == fastjson.TypeObject {
		p.countGeminiContent(req, contents)
	}
	for _, c := range array(contents) {
		p.countGeminiContent(req, c)
	}
	if system != nil && system.Type() == fastjson.TypeString {
		addString(req, system)
	} else {
		p.countGeminiContent(req, system)
	}
	return model, nil
}

// countGeminiContent counts a Content's parts: text, and the JSON of
// function calls and responses, which the model reads back. inlineData and
// fileData are media, not text.
func (p *Parser) countGeminiContent(req *Request, content *fastjson.Value) {
	for _, part := range array(last(content, "parts")) {
		visit(part, func(k []byte, v *fastjson.Value) {
			switch string(k) {
			case "text":
				addString(req, v)
			case "functionCall", "function_call":
				p.addJSON(req, last(v, "args"))
			case "functionResponse", "function_response":
				p.addJSON(req, last(v, "response"))
			}
		})
	}
}

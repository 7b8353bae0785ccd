// Package benchreport writes the mesh benchmark's results: a Markdown
// report and a PNG chart (drawn with the standard library and a bitmap
// font, so that it needs nothing installed).
package benchreport

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"os"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// Kind says whose figure a bar is: it gives the bar's colour, the same in
// every panel, so that haconnect and each peer read apart at a glance.
type Kind int

const (
	Other     Kind = iota // e.g. straight to the app
	Haconnect             // haconnect's data plane
	Consul                // Consul's built-in proxy
	Ceiling               // bare HAProxy, nothing else: the limit
	Variant               // haconnect with a feature switched off
)

var kindColor = map[Kind]color.RGBA{
	Other:     {0xbd, 0xbd, 0xbd, 0xff},
	Haconnect: {0x1e, 0x88, 0xe5, 0xff},
	Consul:    {0xfb, 0x8c, 0x00, 0xff},
	Ceiling:   {0x61, 0x61, 0x61, 0xff},
	Variant:   {0x90, 0xca, 0xf9, 0xff},
}

var kindName = map[Kind]string{
	Haconnect: "haconnect", Consul: "Consul's proxy", Ceiling: "bare HAProxy (ceiling)", Variant: "haconnect, one feature off", Other: "no proxy",
}

// Bar is one bar of a panel.
type Bar struct {
	Label string
	Value float64
	Note  string // printed after the value, e.g. a ratio
	Kind  Kind
	// Group, when it changes from the bar before, is printed as a
	// heading above the bar (e.g. a matrix cell).
	Group string
}

// Panel is one horizontal bar chart with its own scale.
type Panel struct {
	Title  string // e.g. "req/s (higher is better)"
	Unit   string // after each value
	Format string // of each value, default "%.0f"
	Bars   []Bar
}

const (
	width            = 1320
	rowH             = 22
	left             = 420 // bars start here; labels are left of it
	right            = 420 // room for the value and the note
	panelGap         = 18
	titleH, legendH  = 34, 26
	charW            = 7 // basicfont.Face7x13
	maxLabelChars    = (left - 30) / charW
	panelTitleHeight = 24
)

// Chart draws the panels one under the other, under a title and a legend
// of the kinds the bars use, and writes a PNG to path.
func Chart(path, title string, panels []Panel) error {
	height := titleH + legendH
	for _, p := range panels {
		height += panelTitleHeight + panelGap
		group := ""
		for _, b := range p.Bars {
			if b.Group != "" && b.Group != group {
				height += rowH
				group = b.Group
			}
			height += rowH
		}
	}
	height += 10
	img := image.NewRGBA(image.Rect(0, 0, width, height))
	draw.Draw(img, img.Bounds(), image.NewUniform(color.White), image.Point{}, draw.Src)
	text := func(x, y int, s string, c color.Color) {
		d := &font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
		d.DrawString(s)
	}
	box := func(x0, y0, x1, y1 int, c color.Color) {
		draw.Draw(img, image.Rect(x0, y0, x1, y1), image.NewUniform(c), image.Point{}, draw.Src)
	}
	text(20, 22, title, color.Black)
	// The legend: the kinds used, in a fixed order.
	used := map[Kind]bool{}
	for _, p := range panels {
		for _, b := range p.Bars {
			used[b.Kind] = true
		}
	}
	x := 20
	for _, k := range []Kind{Haconnect, Variant, Consul, Ceiling, Other} {
		if !used[k] {
			continue
		}
		box(x, titleH+2, x+14, titleH+14, kindColor[k])
		text(x+20, titleH+13, kindName[k], color.Black)
		x += 20 + charW*len(kindName[k]) + 24
	}
	y := titleH + legendH
	grey := color.RGBA{0x75, 0x75, 0x75, 0xff}
	for _, p := range panels {
		y += panelGap
		box(20, y-8, width-20, y-7, color.RGBA{0xe0, 0xe0, 0xe0, 0xff})
		text(20, y+12, p.Title, color.Black)
		y += panelTitleHeight
		maxV := 0.0
		for _, b := range p.Bars {
			maxV = max(maxV, b.Value)
		}
		format := p.Format
		if format == "" {
			format = "%.0f"
		}
		group := ""
		for _, b := range p.Bars {
			if b.Group != "" && b.Group != group {
				text(30, y+15, b.Group, grey)
				y += rowH
				group = b.Group
			}
			label := b.Label
			if len(label) > maxLabelChars {
				label = label[:maxLabelChars-3] + "..."
			}
			text(30, y+15, label, color.Black)
			w := 0
			if maxV > 0 && b.Value > 0 {
				w = int(float64(width-left-right) * b.Value / maxV)
			}
			box(left, y+4, left+w, y+rowH-4, kindColor[b.Kind])
			text(left+w+8, y+15, fmt.Sprintf(format+" %s %s", b.Value, p.Unit, b.Note), color.Black)
			y += rowH
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// BarChart draws one panel of bars scaled to the largest value.
func BarChart(path, title, unit string, bars []Bar) error {
	return Chart(path, title, []Panel{{Title: unit, Unit: unit, Bars: bars}})
}
